"""Prepare, on a machine with a package index, the folder the GPU check carries to a machine without one.

The GPU machine has Python, torch, transformers, CUDA's compiler and CMake, but no package index, and what travels
with the working tree is limited to 64 MiB. So this writes ``.gpu-carry/`` (ignored by git):

- ``llama-cpp-python/``: llama-cpp-python's source distribution, trimmed to what its CUDA (or CPU) build needs. The
  sdist is 76.6 MB packed, 217 MB unpacked; the other backends (Metal, Vulkan, SYCL, OpenCL, CANN, MUSA, HIP …),
  llama.cpp's tools, examples, tests, docs and web UI, and the vocab files of models we do not use are dropped. Kept:
  llama.cpp's library sources (``src``, ``include``, ``common``, ``ggml`` with its CPU and CUDA backends, ``vendor``,
  ``cmake``), ``tools/batched-bench`` (llama.cpp's own batched decoding benchmark, for comparison), the Python
  package ``llama_cpp``, and the Qwen2 and Llama-3 vocab files our fixture tokenizers are built from
  (``vendor/llama.cpp/models/ggml-vocab-{qwen2,llama-bpe}.gguf`` and their ``.inp``/``.out``; point
  ``RANK1_VOCAB_DIR`` at that folder).
- ``wheels/``: pure-Python wheels of what the GPU machine lacks: ``gguf`` (our exporter), ``diskcache`` (imported by
  ``llama_cpp``), and ``scikit-build-core`` with ``pathspec``, llama-cpp-python's build backend (the build runs with
  ``--no-build-isolation``, so nothing is fetched).
- ``MANIFEST.json``: what was kept and dropped, the sdist's SHA-256, the wheels, the sizes.

The project itself travels as tracked files. The total (working tree + carry) is checked against the limit.

    python -m benchmarks.gpu.prepare [--carry .gpu-carry] [--sdist llama_cpp_python-0.3.36.tar.gz]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_PYTHON = "0.3.36"
LIMIT_MIB = 64
# Pure-Python wheels the GPU machine lacks (its image has numpy, pyyaml, requests, tqdm, packaging, jinja2,
# typing-extensions, huggingface-hub, safetensors, tokenizers, torch and transformers).
WHEELS = ("gguf==0.19.0", "diskcache==5.6.3", "scikit-build-core==1.1.2", "pathspec==1.1.1")
WHEEL_PLATFORM_ARGS = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--platform",
                       "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
                       "manylinux2014_x86_64", "--no-deps")

# Inside the sdist (paths below its top folder)
_KEEP_TOP = {"CMakeLists.txt", "pyproject.toml", "README.md", "LICENSE.md", "PKG-INFO", "llama_cpp"}
_LLAMA = "vendor/llama.cpp"
_KEEP_LLAMA = {"CMakeLists.txt", "LICENSE", "cmake", "include", "src", "common", "ggml", "vendor", "licenses",
               "tools/batched-bench"}
_KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}
VOCAB_FILES = tuple(f"ggml-vocab-{name}.gguf{suffix}" for name in ("qwen2", "llama-bpe") for suffix in ("", ".inp",
                                                                                                       ".out"))
# What the carry must hold for the CUDA build and the fixtures (checked after trimming, and by the tests)
REQUIRED = ("CMakeLists.txt", "pyproject.toml", "llama_cpp/llama_cpp.py", f"{_LLAMA}/CMakeLists.txt",
            f"{_LLAMA}/ggml/src/ggml-cuda/CMakeLists.txt", f"{_LLAMA}/ggml/src/ggml-cuda/ggml-cuda.cu",
            f"{_LLAMA}/ggml/src/ggml-cuda/mmq.cu", f"{_LLAMA}/ggml/src/ggml-cuda/fattn.cu",
            f"{_LLAMA}/ggml/src/ggml-cpu/CMakeLists.txt", f"{_LLAMA}/src/llama.cpp", f"{_LLAMA}/common/CMakeLists.txt",
            f"{_LLAMA}/tools/batched-bench/batched-bench.cpp",
            *(f"{_LLAMA}/models/{name}" for name in VOCAB_FILES))
SDIST_DIR = "llama-cpp-python"
VOCAB_DIR = f"{SDIST_DIR}/{_LLAMA}/models"


def keep(rel: str) -> bool:
    """Whether the sdist file ``rel`` (relative to the sdist's top folder) goes into the carry."""
    parts = PurePosixPath(rel).parts
    if not parts:
        return False
    if parts[0] != "vendor":
        return parts[0] in _KEEP_TOP
    if len(parts) < 3 or "/".join(parts[:2]) != _LLAMA:
        return False
    inner = parts[2:]
    if inner[0] == "models":
        return len(inner) == 2 and inner[1] in VOCAB_FILES
    if inner[0] == "tools":
        return "/".join(inner[:2]) in _KEEP_LLAMA
    if inner[0] not in _KEEP_LLAMA:
        return False
    if inner[:2] == ("ggml", "src") and len(inner) > 3 and inner[2].startswith("ggml-"):
        return inner[2] in _KEEP_BACKENDS  # a backend's folder: CPU and CUDA only
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(dest: Path) -> Path:
    """llama-cpp-python's sdist (``pip download``), kept in ``dest`` for the next prepare."""
    target = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                        "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        os.replace(Path(tmp) / target.name, target)
    return target


def extract_trimmed(sdist: Path, dest: Path) -> dict[str, int]:
    """Unpack the kept files of ``sdist`` into ``dest``; counts and bytes kept and dropped."""
    counts = {"kept_files": 0, "kept_bytes": 0, "dropped_files": 0, "dropped_bytes": 0}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not keep(rel):
                counts["dropped_files"] += 1
                counts["dropped_bytes"] += member.size
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            os.chmod(out, member.mode & 0o777 | 0o600)
            os.utime(out, (member.mtime, member.mtime))  # the sdist's times: a re-made carry is the same tree
            counts["kept_files"] += 1
            counts["kept_bytes"] += member.size
    missing = [rel for rel in REQUIRED if not (dest / rel).is_file()]
    if missing:
        raise SystemExit(f"error: the trimmed sdist lacks {', '.join(missing)} (did the sdist's layout change?)")
    return counts


def download_wheels(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", *WHEEL_PLATFORM_ARGS, "-d", str(dest),
                    *WHEELS], check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def working_tree_bytes(root: Path = ROOT) -> int | None:
    """Bytes of what travels with the working tree besides the carry: tracked files and untracked files git does not
    ignore (None outside a git checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for name in listed.decode().split("\0"):
        path = root / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def check_carry(carry: Path) -> list[str]:
    """What is wrong with a carry folder (empty when it is complete)."""
    problems = [f"missing {SDIST_DIR}/{rel}" for rel in REQUIRED if not (carry / SDIST_DIR / rel).is_file()]
    wheels = {p.name.split("-")[0].replace("_", "-").lower() for p in (carry / "wheels").glob("*.whl")}
    problems += [f"missing the {spec.split('==')[0]} wheel" for spec in WHEELS if spec.split("==")[0] not in wheels]
    return problems


def prepare(carry: Path, sdist: Path | None, limit_mib: int = LIMIT_MIB) -> dict:
    start = time.perf_counter()
    sdist = sdist or fetch_sdist(Path.home() / ".cache" / "rank1-local" / "sdist")
    staging = carry.with_name(carry.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts = extract_trimmed(sdist, staging / SDIST_DIR)
    wheels = download_wheels(staging / "wheels")
    carry_bytes = tree_bytes(staging)
    tree = working_tree_bytes()
    total = carry_bytes + (tree or 0)
    manifest = {
        "made": time.strftime("%Y-%m-%d %H:%M:%S %z"), "llama_cpp_python": LLAMA_CPP_PYTHON, "sdist": sdist.name,
        "sdist_sha256": _sha256(sdist), "sdist_bytes": sdist.stat().st_size, **counts, "wheels": wheels,
        "carry_bytes": carry_bytes, "working_tree_bytes": tree, "total_bytes": total, "limit_bytes": limit_mib << 20,
        "vocab_dir": VOCAB_DIR, "kept_llama_cpp": sorted(_KEEP_LLAMA), "kept_backends": sorted(_KEEP_BACKENDS),
    }
    (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    problems = check_carry(staging)
    if problems:
        raise SystemExit(f"error: the carry folder is incomplete: {'; '.join(problems)}")
    shutil.rmtree(carry, ignore_errors=True)
    staging.rename(carry)
    mib = 1 << 20
    print(f"{carry}: {carry_bytes / mib:.1f} MiB (llama-cpp-python {LLAMA_CPP_PYTHON}: kept {counts['kept_files']} "
          f"files, {counts['kept_bytes'] / mib:.1f} MiB; dropped {counts['dropped_files']} files, "
          f"{counts['dropped_bytes'] / mib:.1f} MiB; wheels: {', '.join(wheels)})")
    tree_text = "unknown (not a git checkout)" if tree is None else f"{tree / mib:.1f} MiB"
    print(f"working tree besides it: {tree_text}; together {total / mib:.1f} MiB of the {limit_mib} MiB that may "
          f"travel ({time.perf_counter() - start:.0f} s)")
    if total > limit_mib * mib:
        raise SystemExit(f"error: {total / mib:.1f} MiB would travel, more than {limit_mib} MiB")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz (default: pip download it, once)")
    parser.add_argument("--limit-mib", type=int, default=LIMIT_MIB)
    args = parser.parse_args()
    prepare(args.carry.resolve(), args.sdist, args.limit_mib)


if __name__ == "__main__":
    main()
