"""Every ``bash`` and ``python`` block of the README runs as written, top to bottom, on fixture models.

The blocks run in README order in one fresh folder (what one block writes — ``docs.txt``, ``models/…`` — the next
one uses), offline (``HF_HUB_OFFLINE=1``), with rank1-local's own folder in the test's temporary folder. Only these
rules stand between the README and what runs:

- **Hub ids are fixture models at those paths.** Each checkpoint id the README names (``jhu-clsp/rank1-0.5b`` …) is
  a folder of that relative path holding the ``behaving`` fixture checkpoint (a local folder is what a hub id
  resolves to), and each GGUF repository (``owner/rank1-7b-GGUF``) is in an offline Hugging Face cache with the
  fixture's export. A new hub id in the README must be added to ``CHECKPOINTS`` or ``GGUF_REPOS``.
- **Install commands are not run**: the tests run in an installed environment. ``python3 -m venv DIR``,
  ``. DIR/bin/activate`` and ``pip install|uninstall …`` become ``true``.
- **The commands are this checkout's.** ``rank1-local``, ``rank1-quantize`` and ``rank1-bench`` run the entry points
  ``pyproject.toml`` declares, from this checkout (whatever an installed copy's scripts point at).
- **A server runs in the background.** A ``rank1-local serve …`` line starts the server on a free port (which
  replaces ``8080`` everywhere), waits until it answers ``/health``, and leaves it running for the blocks after it,
  until the next ``serve`` line or the end.
- **A block that cannot run here** (it needs the hub, a GPU, vLLM, minutes of GPTQ…) has the comment
  ``<!-- not run by the README test: WHY -->`` on the line(s) just above it. Keep these few; each must say why.

The quick part checks the parsing and the markers; running the blocks is the full tier (``-m readme`` alone).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARK = "<!-- not run by the README test:"
CHECKPOINTS = {"jhu-clsp/rank1-0.5b": "behaving", "jhu-clsp/rank1-7b": "behaving"}
GGUF_REPOS = {"owner/rank1-7b-GGUF": ("behaving", "Q4_K_M", "rank1-7b-Q4_K_M.gguf")}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, from 1
    skip: str | None  # why it is not run, or None


def readme_blocks(text: str) -> list[Block]:
    """The fenced ``bash``/``python`` blocks of a Markdown text, each with the not-run reason written above it."""
    lines = text.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in ("bash", "sh", "python"):
            blocks.append(Block("python" if fence.group(1) == "python" else "bash", "\n".join(lines[i + 1:end]),
                                i + 1, _skip_reason(lines, i)))
        i = end + 1
    return blocks


def _skip_reason(lines: list[str], fence: int) -> str | None:
    """The reason in a ``<!-- not run by the README test: … -->`` comment ending on the line above ``fence``."""
    k = fence - 1
    if k < 0 or not lines[k].rstrip().endswith("-->"):
        return None
    start = k
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    comment = " ".join(line.strip() for line in lines[start:k + 1])
    if not comment.startswith(SKIP_MARK):
        return None
    return comment[len(SKIP_MARK):].removesuffix("-->").strip()


# -- quick: the parsing, the markers, the inputs table ------------------------------------------------------------


@pytest.mark.quick
def test_the_readme_blocks_are_found_and_every_skip_says_why():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 15 and {b.lang for b in blocks} == {"bash", "python"}
    skipped = [b for b in blocks if b.skip is not None]
    assert all(len(b.skip) > 20 for b in skipped), [b.line for b in skipped]
    assert len(skipped) < len(blocks) / 2  # few: most blocks run
    first, hub = blocks[0], blocks[1]  # the install, then the demo; the hub route next to it
    assert first.skip is None and first.code.splitlines()[-1] == "rank1-local demo"
    assert "pip install -e ." in first.code and "--extra-index-url https://abetlen.github.io/llama-cpp-python" in first.code
    assert hub.skip is None and "rank1-quantize gguf jhu-clsp/rank1-0.5b" in hub.code
    text = README.read_text(encoding="utf-8")  # what a source build of llama-cpp-python costs, and how to watch it
    assert "7 to 21 minutes on 2 busy cores" in text and "pip install -v" in text and "about 7 minutes" not in text


@pytest.mark.quick
def test_markers_are_read_only_right_above_a_block():
    text = ("<!-- not run by the README test: needs a GPU and\n   the hub -->\n```bash\nnvidia-smi\n```\n\n"
            "prose\n```python\nprint(1)\n```\n<!-- a comment -->\n```bash\ntrue\n```\n```\nplain output\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.code, b.skip) for b in blocks] == [("bash", "nvidia-smi", "needs a GPU and the hub"),
                                                          ("python", "print(1)", None), ("bash", "true", None)]


@pytest.mark.quick
def test_the_inputs_table_names_tests_that_exist():
    """docs/inputs.md lists the inputs tried and what each gets; each row names the test that keeps it true."""
    table = (ROOT / "docs" / "inputs.md").read_text(encoding="utf-8")
    assert "docs/inputs.md" in README.read_text(encoding="utf-8")
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 30
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), f"{path}::{name}"


EXTRA_COMMENT = re.compile(r"^#\s*pip install -e '\.\[([\w,-]+)\]'", re.M)


def _dist(requirement: str) -> tuple[str, list[str]]:
    """A requirement's normalized distribution name and its extras: ``"ray[data,serve]>=2.60"`` -> (ray, [data, serve])."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, requirement
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), extras


def installed_by(extras: list[str], project: dict) -> set[str]:
    """The distributions ``pip install -e '.[EXTRAS]'`` asks for by name: the dependencies and each extra's own (an
    extra that names ``rank1-local[other]`` brings that one's too)."""
    optional = project["optional-dependencies"]
    names = {_dist(r)[0] for r in project["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        assert extra in optional, f"the README names an extra that pyproject.toml lacks: [{extra}]"
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            name, more = _dist(requirement)
            if name == "rank1-local":
                todo += more
            else:
                names.add(name)
    return names


def with_their_requirements(names: set[str]) -> set[str]:
    """``names`` and what each, as installed here, requires unconditionally (a metapackage such as python-terrier
    installs the distribution that holds the module, pyterrier)."""
    from importlib.metadata import PackageNotFoundError, requires

    out = set(names)
    for name in names:
        try:
            out |= {_dist(r)[0] for r in requires(name) or [] if "extra ==" not in r}
        except PackageNotFoundError:
            pass
    return out


def imported_top_level(code: str) -> set[str]:
    """The top-level modules a Python block imports, but for the standard library and this project's packages."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"rank1_local", "quantize", "benchmarks"}


@pytest.mark.quick
def test_each_python_block_installs_what_it_imports():
    """A Python block that imports beyond the default install names the extra that installs it, in its first comment
    (``# pip install -e '.[cohere]'``), and that extra, read from pyproject.toml, asks for every distribution the
    block imports: a user who installs what the README says can run the block."""
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    providers = packages_distributions()
    blocks = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.lang == "python"]
    assert len(blocks) >= 8
    for block in blocks:
        extras = [e for group in EXTRA_COMMENT.findall(block.code) for e in group.split(",")]
        allowed = with_their_requirements(installed_by(extras, project))
        for module in sorted(imported_top_level(block.code)):
            if module not in providers:
                pytest.skip(f"{module} is not installed here (the dev extra installs every one)")
            dists = {_dist(d)[0] for d in providers[module]}
            assert dists & allowed, (f"README.md:{block.line}: the block imports {module} ({', '.join(dists)}), which "
                                     f"{'[' + ','.join(extras) + ']' if extras else 'the default install'} does not "
                                     "install; name the extra in a first comment: # pip install -e '.[EXTRA]'")


# -- full tier: run them ------------------------------------------------------------------------------------------

PRELUDE = r'''
readme_serve() {  # a `rank1-local serve` line: in the background on the test's port, until the next one
  if [ -s "$README_SERVER_PID" ]; then
    kill "$(cat "$README_SERVER_PID")" 2>/dev/null || true
    while kill -0 "$(cat "$README_SERVER_PID")" 2>/dev/null; do sleep 0.2; done
  fi
  "$@" --port "$README_PORT" >> "$README_SERVER_LOG" 2>&1 &
  echo $! > "$README_SERVER_PID"
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$README_PORT/health" > /dev/null && return 0
    kill -0 "$(cat "$README_SERVER_PID")" 2>/dev/null || { echo "the server exited" >&2; return 1; }
    sleep 0.2
  done
  return 1
}
'''
INSTALL = [(re.compile(r"python3 -m venv \S+"), "true"), (re.compile(r"(?<![\w/])\. \S+/bin/activate"), "true"),
           (re.compile(r"\bpip (?:install|uninstall)\b[^&;|#\n]*"), "true ")]
SERVE = re.compile(r"^(\s*(?:[A-Z_]+=\S+\s+)*)rank1-local serve\b(.*?)(\s+#.*)?$", re.M)


def runnable(block: Block, port: int) -> str:
    code = block.code.replace("8080", str(port))
    if block.lang == "bash":
        for pattern, replacement in INSTALL:
            code = pattern.sub(replacement, code)
        code = SERVE.sub(r"\1readme_serve rank1-local serve\2", code)
    return code


def _console_scripts(folder: Path) -> Path:
    """Scripts for the commands ``pyproject.toml`` declares, calling this checkout's entry points."""
    import tomllib

    folder.mkdir()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; from {module} import {func}; '
                          f'sys.argv[0] = \'{name}\'; sys.exit({func}())" "$@"\n')
        script.chmod(0o755)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hub_cache(root: Path, exported) -> Path:
    """An offline Hugging Face cache holding each GGUF repository the README pulls (as huggingface-hub lays it out)."""
    for repo, (fixture, gguf_type, name) in GGUF_REPOS.items():
        storage = root / ("models--" + repo.replace("/", "--"))
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(COMMIT)
        (storage / "blobs").mkdir()
        blob = storage / "blobs" / "blob-0"
        shutil.copyfile(exported(fixture, gguf_type), blob)
        (storage / "snapshots" / COMMIT).mkdir(parents=True)
        (storage / "snapshots" / COMMIT / name).symlink_to(os.path.relpath(blob, storage / "snapshots" / COMMIT))
    return root


@pytest.mark.readme
def test_every_readme_block_runs(tmp_path, fixture_dir, exported):
    pytest.importorskip("fastapi")
    pytest.importorskip("cohere")
    work = tmp_path / "work"
    work.mkdir()
    for hub_id, fixture in CHECKPOINTS.items():
        (work / hub_id).parent.mkdir(parents=True, exist_ok=True)
        (work / hub_id).symlink_to(fixture_dir(fixture), target_is_directory=True)
    port = _free_port()
    pid_file, server_log = tmp_path / "server.pid", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RANK1_LOCAL_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_CACHE=str(_hub_cache(tmp_path / "hf-hub", exported)), RANK1_LOCAL_HOME=str(tmp_path / "home"),
               PATH=os.pathsep.join([str(_console_scripts(tmp_path / "bin")), str(Path(sys.executable).parent),
                                     env.get("PATH", "")]),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               README_PORT=str(port), README_SERVER_PID=str(pid_file), README_SERVER_LOG=str(server_log))
    timings = []
    try:
        for block in readme_blocks(README.read_text(encoding="utf-8")):
            if block.skip is not None:
                timings.append((block.line, "not run", block.skip))
                continue
            code = runnable(block, port)
            cmd = ["bash", "-e", "-o", "pipefail", "-c", PRELUDE + code] if block.lang == "bash" else \
                [sys.executable, "-c", code]
            start = time.monotonic()
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            seconds = time.monotonic() - start
            timings.append((block.line, f"{seconds:.1f} s", block.code.split("\n")[0][:60]))
            assert done.returncode == 0, (f"README.md:{block.line}: the {block.lang} block failed ({done.returncode})"
                                          f"\n{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n"
                                          f"{done.stderr[-5000:]}")
            assert "Traceback" not in done.stderr, f"README.md:{block.line}:\n{done.stderr[-5000:]}"
    finally:
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
        (tmp_path / "timings.json").write_text(json.dumps(timings, indent=1))
        print("\n".join(f"README.md:{line}  {what:>8}  {first}" for line, what, first in timings))
    assert server_log.exists() and "Traceback" not in server_log.read_text()
