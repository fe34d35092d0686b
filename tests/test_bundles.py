"""Bundles for offline and air-gapped machines: `rank1-local pull` from a fake Hugging Face cache, checksums that refuse
a changed file, `rank1-local list`, and hub access that gives up at once offline (quick tier, except the last test,
which runs a fixture export end to end)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from rank1_local.core.errors import CorruptFileError, ModelNotFoundError, Rank1Error, UnsupportedModelError
from rank1_local.models.bundle import MANIFEST, BundleSource, is_bundle, open_bundle, read_bundle, write_bundle
from rank1_local.models.gguf_file import LLAMA_FTYPES
from rank1_local.models.hub import cached_snapshot, check_hub, probe_endpoint
from rank1_local.models.model_files import resolve_gguf
from rank1_local.models.pull import pull

ROOT = Path(__file__).resolve().parents[1]
REPO = "owner/rank1-tiny-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {  # name in the repository -> the type its metadata declares
    "rank1-tiny-F16.gguf": "F16",
    "rank1-tiny-BF16.gguf": "BF16",
    "rank1-tiny-Q4_K_M-00001-of-00002.gguf": "Q4_K_M",
    "rank1-tiny-Q4_K_M-00002-of-00002.gguf": None,
}
CLOSED_PORT_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once


def write_gguf(path: Path, file_type: str | None, payload: float) -> Path:
    """A tiny valid GGUF file (one 16-float tensor), different for each ``payload``."""
    writer = gguf.GGUFWriter(path, "llama")
    if file_type is not None:
        writer.add_file_type(LLAMA_FTYPES[file_type])
    writer.add_tensor("t", np.full(16, payload, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache laid out as huggingface-hub writes it: refs/main holds the commit, blobs/<sha256>
    the bytes, snapshots/<commit>/<name> a relative symlink to the blob."""
    storage = root / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    for i, (name, file_type) in enumerate({**FILES, "README.md": None}.items()):
        staged = root / name
        if name.endswith(".gguf"):
            write_gguf(staged, file_type, float(i))
        else:
            staged.write_text("# a model card\n")
        blob = storage / "blobs" / sha256(staged)
        staged.rename(blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return root / "hub"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake cache, offline, with rank1-local's own folder (bundles, digest memo) in tmp_path too."""
    import huggingface_hub.constants as hf_constants

    cache = make_hub_cache(tmp_path / "hf")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    return cache


def cli_env(tmp_path: Path, cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and not k.lower().endswith("_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(cache or tmp_path / "no-cache"),
               RANK1_LOCAL_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rank1_local.cli.main", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.quick
def test_pull_from_the_offline_cache_writes_a_checked_bundle(tmp_path):
    cache = make_hub_cache(tmp_path / "hf")
    out = tmp_path / "bundles" / "tiny"
    done = run_cli(["pull", REPO, "--type", "F16", "--out", str(out)], cli_env(tmp_path, cache, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(out)
    manifest = json.loads((out / MANIFEST).read_text())
    source_file = cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT / "rank1-tiny-F16.gguf"
    assert manifest["format"] == "rank1-bundle" and manifest["format_version"] == 1
    assert manifest["type"] == "F16"
    assert manifest["files"] == [{"name": "rank1-tiny-F16.gguf", "size": source_file.stat().st_size,
                                  "sha256": sha256(source_file)}]
    assert manifest["source"] == {"kind": "gguf", "repo": REPO, "revision": COMMIT, "files": ["rank1-tiny-F16.gguf"]}
    assert manifest["created"].endswith("+00:00") and manifest["rank1_local_version"]
    assert manifest["verification"] is None and manifest["card"] == "rank1"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "rank1-tiny-F16.gguf"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.quick
def test_the_type_is_matched_exactly_f16_is_not_bf16(hub, tmp_path):
    f16 = pull(REPO, "F16", tmp_path / "f16")
    bf16 = pull(REPO, "bf16", tmp_path / "bf16")
    assert [f.name for f in f16.files] == ["rank1-tiny-F16.gguf"] and f16.type == "F16"
    assert [f.name for f in bf16.files] == ["rank1-tiny-BF16.gguf"] and bf16.type == "BF16"
    assert f16.files[0].sha256 != bf16.files[0].sha256


@pytest.mark.quick
def test_a_split_gguf_comes_with_every_part_and_loads_by_its_first(hub, tmp_path):
    bundle = pull(REPO, "Q4_K_M", tmp_path / "q4")
    assert [f.name for f in bundle.files] == ["rank1-tiny-Q4_K_M-00001-of-00002.gguf",
                                             "rank1-tiny-Q4_K_M-00002-of-00002.gguf"]
    assert bundle.source.files == tuple(f.name for f in bundle.files)
    assert resolve_gguf(tmp_path / "q4") == tmp_path / "q4" / "rank1-tiny-Q4_K_M-00001-of-00002.gguf"


@pytest.mark.quick
def test_default_bundle_folder_is_named_after_repository_and_type(hub, tmp_path):
    bundle = pull(REPO, "F16")
    assert bundle.path == tmp_path / "home" / "bundles" / "rank1-tiny-GGUF-F16"


@pytest.mark.quick
def test_a_type_the_repository_lacks_gives_the_toolchain_command(hub, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"(?s)holds no Q8_0 GGUF \(it holds BF16, F16, Q4_K_M\).*"
                                                 r"rank1-quantize gguf owner/rank1-tiny-GGUF --out models --types Q8_0 "
                                                 r"--bundle"):
        pull(REPO, "Q8_0", tmp_path / "q8")
    with pytest.raises(ModelNotFoundError, match="unknown GGUF type 'Q9_X'"):
        pull(REPO, "Q9_X", tmp_path / "q9")
    assert not (tmp_path / "q8").exists()


@pytest.fixture
def online_hub(hub, monkeypatch):
    """The hub answering from the fake cache: model_info lists the files (with their LFS SHA-256), hf_hub_download
    returns the cached copies; calls are recorded."""
    from types import SimpleNamespace

    import huggingface_hub

    import rank1_local.models.model_files as model_files
    from rank1_local.models.hub import HubAccess

    snapshot = cached_snapshot(REPO)
    lfs = {name: sha256(snapshot / name) for name in FILES}
    calls: list[tuple[str, str | None]] = []

    def model_info(self, repo_id, files_metadata=False, **kwargs):
        siblings = [SimpleNamespace(rfilename=n, lfs=SimpleNamespace(sha256=lfs[n]) if n in lfs else None)
                    for n in [*FILES, "README.md"]]
        return SimpleNamespace(sha=COMMIT, siblings=siblings)

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append((filename, revision))
        return str(snapshot / filename)

    monkeypatch.setattr(model_files, "check_hub", lambda: HubAccess(True))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return SimpleNamespace(calls=calls, lfs=lfs)


@pytest.mark.quick
def test_online_pull_downloads_the_commit_it_listed_and_checks_the_hub_checksums(online_hub, tmp_path):
    bundle = pull(REPO, "Q4_K_M", tmp_path / "b")
    assert online_hub.calls == [("rank1-tiny-Q4_K_M-00001-of-00002.gguf", COMMIT),
                                ("rank1-tiny-Q4_K_M-00002-of-00002.gguf", COMMIT)]
    assert bundle.source.revision == COMMIT
    assert [f.sha256 for f in bundle.files] == [online_hub.lfs[f.name] for f in bundle.files]
    with pytest.raises(ModelNotFoundError, match=r"owner/rank1-tiny-GGUF has no Q8_0 GGUF \(it has BF16, F16, "
                                                 r"Q4_K_M\); export it once.*--bundle"):
        pull(REPO, "Q8_0", tmp_path / "q8")


@pytest.mark.quick
def test_a_hub_that_fails_to_list_falls_back_to_the_cache(online_hub, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    def server_error(self, repo_id, **kwargs):
        raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", server_error)
    with caplog.at_level(logging.WARNING):
        bundle = pull(REPO, "F16", tmp_path / "b")
    assert bundle.source.revision == COMMIT and online_hub.calls == []
    assert "cannot list owner/rank1-tiny-GGUF on the hub (RuntimeError: 503" in caplog.text
    with pytest.raises(ModelNotFoundError, match=r"owner/other-GGUF: no such file or folder here, and as a hub id it is "
                                                 r"not in the local cache .* \(listing "
                                                 r"owner/other-GGUF failed: RuntimeError: 503"):
        pull("owner/other-GGUF", "F16", tmp_path / "c")


@pytest.mark.quick
def test_a_download_that_differs_from_the_hub_checksum_is_refused(online_hub, tmp_path):
    online_hub.lfs["rank1-tiny-F16.gguf"] = "f" * 64
    with pytest.raises(CorruptFileError, match=r"rank1-tiny-F16.gguf: SHA-256 \w+… differs from the source's "
                                               r"ffff.*download is corrupt"):
        pull(REPO, "F16", tmp_path / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


@pytest.mark.quick
def test_resolve_gguf_opens_a_bundle_and_checks_its_type(hub, tmp_path):
    pull(REPO, "F16", tmp_path / "b")
    assert resolve_gguf(tmp_path / "b") == tmp_path / "b" / "rank1-tiny-F16.gguf"
    assert resolve_gguf(str(tmp_path / "b"), gguf_type="f16") == tmp_path / "b" / "rank1-tiny-F16.gguf"
    with pytest.raises(ModelNotFoundError, match="holds a F16 GGUF, not Q4_K_M"):
        resolve_gguf(tmp_path / "b", gguf_type="Q4_K_M")


@pytest.mark.quick
def test_a_folder_that_is_not_a_bundle_is_a_clear_error(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"models: a folder, but not a rank1-local bundle \(no rank1-bundle"):
        resolve_gguf(tmp_path / "models")


@pytest.mark.quick
def test_a_changed_byte_is_refused_after_the_bundle_is_moved(hub, tmp_path):
    pull(REPO, "F16", tmp_path / "b")
    moved = tmp_path / "usb" / "b"
    shutil.copytree(tmp_path / "b", moved)  # as copied to another machine: nothing remembered for these paths
    gguf_file = moved / "rank1-tiny-F16.gguf"
    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 0xFF
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"rank1-tiny-F16.gguf: SHA-256 \w+… does not match the bundle "
                                               r"manifest"):
        resolve_gguf(moved)
    assert resolve_gguf(tmp_path / "b") == tmp_path / "b" / "rank1-tiny-F16.gguf"  # the original is intact


@pytest.mark.quick
def test_a_truncated_or_missing_file_is_refused(hub, tmp_path):
    bundle = pull(REPO, "Q4_K_M", tmp_path / "b")
    part2 = bundle.path / bundle.files[1].name
    shutil.copyfile(part2, tmp_path / "part2")
    part2.unlink()
    part2.write_bytes((tmp_path / "part2").read_bytes()[:-4])
    with pytest.raises(CorruptFileError, match=r"00002-of-00002.gguf: \d+ bytes, the bundle manifest says \d+"):
        open_bundle(bundle.path)
    part2.unlink()
    with pytest.raises(CorruptFileError, match="00002-of-00002.gguf: missing from the bundle"):
        open_bundle(bundle.path)


@pytest.mark.quick
def test_rerank_with_a_tampered_bundle_is_one_error_line(hub, tmp_path):
    pull(REPO, "F16", tmp_path / "b")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "b", moved)
    with open(moved / "rank1-tiny-F16.gguf", "r+b") as f:
        f.seek(40)
        f.write(b"\x00\x01\x02")
    docs = tmp_path / "docs.txt"
    docs.write_text("a passage\n")
    done = run_cli(["rerank", "--model", str(moved), "--query", "q", "--docs", str(docs)],
                   cli_env(tmp_path, hub, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2
    assert "error: " in done.stderr and "rank1-tiny-F16.gguf: SHA-256" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.quick
def test_pulling_again_is_a_no_op_and_a_different_bundle_is_not_overwritten(hub, tmp_path):
    first = pull(REPO, "F16", tmp_path / "b")
    mtime = (tmp_path / "b" / MANIFEST).stat().st_mtime_ns
    assert pull(REPO, "F16", tmp_path / "b") == first
    assert (tmp_path / "b" / MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(Rank1Error, match=r"already holds a different bundle \(F16 from owner/rank1-tiny-GGUF@"
                                         r"0123456789ab\).*--force"):
        pull(REPO, "BF16", tmp_path / "b")
    assert read_bundle(tmp_path / "b").type == "F16"
    assert pull(REPO, "BF16", tmp_path / "b", replace=True).type == "BF16"
    assert read_bundle(tmp_path / "b").type == "BF16" and not (tmp_path / "b" / "rank1-tiny-F16.gguf").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Rank1Error, match="not empty and not a rank1-local bundle"):
        pull(REPO, "F16", tmp_path / "mine", replace=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.quick
def test_across_file_systems_files_are_copied_and_hashed_once(hub, tmp_path, monkeypatch, caplog):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    with caplog.at_level(logging.INFO):
        bundle = pull(REPO, "F16", tmp_path / "b")
        caplog.clear()
        assert open_bundle(bundle.path) == bundle.gguf
    assert "hashing" not in caplog.text  # hashed while copying, and remembered
    cached = cached_snapshot(REPO) / "rank1-tiny-F16.gguf"
    assert bundle.gguf.stat().st_ino != cached.resolve().stat().st_ino
    assert sha256(bundle.gguf) == bundle.files[0].sha256 == sha256(cached)


@pytest.mark.quick
def test_a_failed_write_leaves_no_half_bundle(tmp_path, monkeypatch):
    import rank1_local.models.bundle as bundle_module

    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    parts = [write_gguf(tmp_path / f"m-Q8_0-0000{i}-of-00002.gguf", "Q8_0", i) for i in (1, 2)]
    calls = []

    def failing_place(src, dst, link):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(src, dst, link)

    original = bundle_module._place
    monkeypatch.setattr(bundle_module, "_place", failing_place)
    with pytest.raises(OSError, match="No space left"):
        write_bundle(tmp_path / "out" / "b", parts, "Q8_0", BundleSource(path=str(tmp_path)))
    assert list((tmp_path / "out").iterdir()) == []



@pytest.mark.quick
def test_a_killed_write_leaves_nothing_behind_once_written_again(tmp_path, monkeypatch):
    """SIGKILL gives no chance to clean up: the next write of the same bundle removes the dead process's hidden
    folders (a half-copied GGUF can be gigabytes), and leaves those of a write still running."""
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    model = write_gguf(tmp_path / "m-Q8_0.gguf", "Q8_0", 1)
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".b.{dead}.partial", f".b.{dead}.old", f".b.{running.pid}.partial"):
            (out.parent / name).mkdir()
            (out.parent / name / "m-Q8_0.gguf").write_bytes(b"half a copy")
        write_bundle(out, [model], "Q8_0", BundleSource(path=str(tmp_path)))
        assert sorted(p.name for p in out.parent.iterdir()) == [f".b.{running.pid}.partial", "b"]
    finally:
        running.kill()
        running.wait()


@pytest.mark.quick
def test_pull_a_local_file_takes_its_type_and_verification_card(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    (tmp_path / "models").mkdir()
    model = write_gguf(tmp_path / "models" / "rank1-tiny-Q8_0.gguf", "Q8_0", 7.0)
    card = {"gguf": str(model), "kl_mean": 0.001, "top1_agreement": 1.0}
    (model.parent / (model.name + ".verify.json")).write_text(json.dumps(card))
    bundle = pull(str(model))
    assert bundle.path == tmp_path / "home" / "bundles" / "rank1-tiny-Q8_0"
    assert bundle.type == "Q8_0" and bundle.verification == card
    assert bundle.source == BundleSource(path=str(model.resolve()), files=("rank1-tiny-Q8_0.gguf",))
    assert read_bundle(bundle.path).verification == card
    with pytest.raises(ModelNotFoundError, match="is a Q8_0 GGUF, not F16"):
        pull(str(model), "F16", tmp_path / "other")
    untyped = write_gguf(tmp_path / "models" / "plain.gguf", None, 1.0)
    with pytest.raises(ModelNotFoundError, match="cannot tell its GGUF type.*--gguf-type"):
        pull(str(untyped))
    assert pull(str(untyped), "q4_0").path.name == "plain-Q4_0"


@pytest.mark.quick
def test_a_bundle_from_a_newer_format_is_refused(hub, tmp_path):
    pull(REPO, "F16", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    (tmp_path / "b" / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UnsupportedModelError, match="format version 99 is newer"):
        resolve_gguf(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).write_text(json.dumps({**manifest, "files": [{"name": "../x.gguf", "size": 1,
                                                                               "sha256": "0" * 64}]}))
    with pytest.raises(CorruptFileError, match="not a valid bundle manifest"):
        read_bundle(tmp_path / "b")
    assert is_bundle(tmp_path / "b") and not is_bundle(tmp_path)


@pytest.mark.quick
def test_list_shows_bundles_folders_and_the_hub_cache(tmp_path):
    cache = make_hub_cache(tmp_path / "hf")
    env = cli_env(tmp_path, cache, HF_HUB_OFFLINE="1")
    assert run_cli(["pull", REPO, "--type", "BF16"], env).returncode == 0
    loose = tmp_path / "models"
    loose.mkdir()
    write_gguf(loose / "rank1-tiny-Q8_0.gguf", "Q8_0", 3.0)
    done = run_cli(["list", str(loose), "--format", "json"], env)
    assert done.returncode == 0, done.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(done.stdout)}
    bundle = rows["bundle", "rank1-tiny-GGUF-BF16"]
    assert bundle["type"] == "BF16" and bundle["source"] == f"{REPO}@{COMMIT[:12]}"
    assert bundle["path"] == str(tmp_path / "home" / "bundles" / "rank1-tiny-GGUF-BF16")
    assert rows["file", "rank1-tiny-Q8_0.gguf"]["type"] == "Q8_0"
    split = rows["hf-cache", "rank1-tiny-Q4_K_M-00001-of-00002.gguf"]
    assert split["source"] == f"{REPO}@{COMMIT[:12]} (main)" and split["type"] == "Q4_K_M"
    assert ("hf-cache", "rank1-tiny-Q4_K_M-00002-of-00002.gguf") not in rows  # a split file is one model
    assert len(rows) == 5
    table = run_cli(["list"], env).stdout.splitlines()
    assert table[0].split() == ["KIND", "NAME", "TYPE", "CARD", "SIZE", "SOURCE", "PATH"]
    assert any(line.split()[:4] == ["bundle", "rank1-tiny-GGUF-BF16", "BF16", "rank1"] for line in table)
    assert len(table) == 1 + 4


@pytest.mark.quick
@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": CLOSED_PORT_ENDPOINT}],
                         ids=["HF_HUB_OFFLINE", "unreachable-endpoint"])
def test_offline_errors_come_at_once_and_say_each_thing_once(tmp_path, offline_env):
    docs = tmp_path / "docs.txt"
    docs.write_text("a passage\n")
    env = cli_env(tmp_path, **offline_env)
    start = time.perf_counter()
    done = run_cli(["rerank", "--model", "owner/rank1-7b-GGUF", "--query", "q", "--docs", str(docs)], env)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: owner/rank1-7b-GGUF: no such file or folder here, and as a hub id it is not in the local cache" \
        in done.stderr
    assert "rank1-local pull owner/rank1-7b-GGUF" in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), done.stderr
    assert elapsed < 5, f"{elapsed:.1f} s"
    if "HF_ENDPOINT" in offline_env:
        assert sum("127.0.0.1:9" in line and "cannot be reached" in line for line in lines) == 2  # warning + error


@pytest.mark.quick
def test_toolchain_checkpoint_download_is_fast_offline_too(tmp_path):
    env = cli_env(tmp_path, HF_ENDPOINT=CLOSED_PORT_ENDPOINT)
    # Against the same command's start-up (interpreter and imports, slow on a loaded machine), not a fixed clock: a
    # hub client retrying a closed endpoint would add tens of seconds.
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantize.cli", "gguf", "--help"], capture_output=True, env=env, cwd=ROOT,
                   timeout=60, check=True)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantize.cli", "gguf", "owner/rank1-7b", "--out",
                           str(tmp_path / "models")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "is not in the local cache" in done.stderr
    assert "`rank1-local demo`" in done.stderr  # the route that needs no hub
    assert time.perf_counter() - start < 2 * startup + 3


@pytest.mark.quick
def test_the_probe_tells_a_listening_endpoint_from_a_closed_one(monkeypatch):
    import huggingface_hub.constants as hf_constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert probe_endpoint(f"http://127.0.0.1:{port}") is None
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert check_hub().online
    reason = probe_endpoint(CLOSED_PORT_ENDPOINT, timeout=1)
    assert reason is not None and reason.startswith("127.0.0.1:9: ")
    assert probe_endpoint("not a url") is not None
    monkeypatch.setattr(hf_constants, "ENDPOINT", CLOSED_PORT_ENDPOINT)
    access = check_hub()
    assert not access.online and "127.0.0.1:9" in access.reason


@pytest.mark.quick
def test_the_probe_goes_to_the_proxy_when_one_is_set(monkeypatch):
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert probe_endpoint("https://hub.invalid") is None  # the name is never resolved: the proxy does that


@pytest.mark.quick
def test_the_cached_snapshot_is_found_by_its_ref(hub):
    assert cached_snapshot(REPO) == hub / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT
    assert cached_snapshot(REPO, COMMIT) == cached_snapshot(REPO)
    assert cached_snapshot("owner/other") is None


@pytest.mark.quick
def test_a_library_message_is_printed_once():
    code = ("import logging; from rank1_local.cli.support import configure_logging; configure_logging(False); "
            "lib = logging.getLogger('somelib'); lib.addHandler(logging.StreamHandler()); "
            "logging.getLogger('somelib.http').warning('retrying once'); "
            "logging.getLogger('rank1_local.x').info('ours once')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stderr.count("retrying once") == 1 and done.stderr.count("ours once") == 1


def test_export_to_a_verified_bundle_and_rerank_from_it(fixture_dir, tmp_path, monkeypatch, caplog):
    """`rank1-quantize gguf --bundle --verify` on the behaving fixture, then `rank1-local rerank --model BUNDLE`."""
    from quantize.cli import main as quantize
    from rank1_local.cli.main import main as rank1_local

    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    source = fixture_dir("behaving")
    bundle_dir = tmp_path / "bundle"
    assert quantize(["-q", "gguf", str(source), "--out", str(tmp_path / "models"), "--types", "Q8_0", "--verify",
                     "--verify-prompts", "2", "--threads", "2", "--bundle", str(bundle_dir)]) == 0
    bundle = read_bundle(bundle_dir)
    assert bundle.type == "Q8_0" and bundle.source.kind == "export" and bundle.card == "rank1"
    assert bundle.source.path == str(source.resolve())
    assert bundle.verification is not None and bundle.verification["n_prompts"] == 2
    shutil.rmtree(tmp_path / "models")  # the bundle stands alone
    docs = tmp_path / "docs.txt"
    docs.write_text("a passage\nanother passage\n")
    with caplog.at_level(logging.INFO):
        assert rank1_local(["rerank", "--model", str(bundle_dir), "--query", "q", "--docs", str(docs), "--format",
                            "json", "--max-think-tokens", "16", "--n-ctx", "512", "--threads", "2"]) == 0
    assert "match the manifest" in caplog.text


# -- issue 20: damaged files, swapped files, bad manifests ---------------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize("gguf_type", ["Q8_0", None])
def test_pull_refuses_a_damaged_gguf_at_once(tmp_path, monkeypatch, gguf_type):
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    good = write_gguf(tmp_path / "good-Q8_0.gguf", "Q8_0", 1.0)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(good.read_bytes()[:-20])  # the tensor data is cut short
    start = time.perf_counter()
    with pytest.raises(CorruptFileError, match=r"damaged.gguf: damaged GGUF file \(tensor t ends at byte \d+ but the "
                                               r"file has \d+ bytes: it is truncated\)"):
        pull(str(damaged), gguf_type, tmp_path / "b")
    assert time.perf_counter() - start < 2 and not (tmp_path / "b").exists()
    damaged.write_bytes(good.read_bytes()[:40])  # cut inside the header
    with pytest.raises(CorruptFileError, match="damaged GGUF file"):
        pull(str(damaged), gguf_type, tmp_path / "b")
    garbled = bytearray(good.read_bytes())
    garbled[8:16] = (10**12).to_bytes(8, "little")  # an absurd tensor count
    damaged.write_bytes(bytes(garbled))
    with pytest.raises(CorruptFileError, match="damaged GGUF file .the header claims"):
        pull(str(damaged), gguf_type, tmp_path / "b")
    assert pull(str(good), gguf_type, tmp_path / "b").type == "Q8_0"


@pytest.mark.quick
def test_a_bundle_is_a_copy_unless_linking_is_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    source = write_gguf(tmp_path / "m-Q8_0.gguf", "Q8_0", 1.0)
    copied = pull(str(source), out=tmp_path / "copied")
    linked = pull(str(source), out=tmp_path / "linked", link=True)
    assert copied.gguf.stat().st_ino != source.stat().st_ino and linked.gguf.stat().st_ino == source.stat().st_ino
    with open(source, "r+b") as f:  # the source is truncated in place
        f.truncate(source.stat().st_size - 8)
    assert open_bundle(copied.path) == copied.gguf  # untouched
    with pytest.raises(CorruptFileError, match="bytes, the bundle manifest says"):
        open_bundle(linked.path)


@pytest.mark.quick
def test_list_shows_a_damaged_bundle_and_verify_finds_a_changed_byte(tmp_path, monkeypatch):
    env = cli_env(tmp_path)
    monkeypatch.setenv("RANK1_LOCAL_HOME", env["RANK1_LOCAL_HOME"])
    folder = tmp_path / "bundles"
    for name in ("good", "cut", "flipped"):
        pull(str(write_gguf(tmp_path / f"{name}-Q8_0.gguf", "Q8_0", float(len(name)))), out=folder / name)
    (folder / "cut" / "cut-Q8_0.gguf").write_bytes((folder / "cut" / "cut-Q8_0.gguf").read_bytes()[:-10])
    data = bytearray((folder / "flipped" / "flipped-Q8_0.gguf").read_bytes())
    data[-1] ^= 0xFF
    (folder / "flipped" / "flipped-Q8_0.gguf").write_bytes(bytes(data))

    rows = {r["name"]: r for r in json.loads(run_cli(["list", str(folder), "--format", "json", "--no-hub-cache"],
                                                     env).stdout)}
    assert rows["good"]["problem"] is None and rows["flipped"]["problem"] is None  # same size: found by hashing
    assert "bytes, the bundle manifest says" in rows["cut"]["problem"]
    table = run_cli(["list", str(folder), "--no-hub-cache"], env).stdout
    assert "DAMAGED:" in [line for line in table.splitlines() if " cut " in f" {line} "][0]
    rows = {r["name"]: r for r in json.loads(run_cli(["list", str(folder), "--format", "json", "--no-hub-cache",
                                                      "--verify"], env).stdout)}
    assert rows["good"]["problem"] is None and "does not match the bundle manifest" in rows["flipped"]["problem"]


@pytest.mark.quick
@pytest.mark.parametrize("source, message", [
    ("a string", "source must be an object"),
    (["a", "list"], "source must be an object"),
    ({"repo": "o/r", "revision": 12345}, "source.revision must be a string"),
    ({"files": "x.gguf"}, "source.files must be a list"),
])
def test_a_bad_manifest_is_an_error_and_list_shows_the_others(tmp_path, monkeypatch, source, message):
    env = cli_env(tmp_path)
    monkeypatch.setenv("RANK1_LOCAL_HOME", env["RANK1_LOCAL_HOME"])
    folder = tmp_path / "bundles"
    for name in ("a-good", "b-bad", "c-good"):
        pull(str(write_gguf(tmp_path / f"{name}-Q8_0.gguf", "Q8_0", 1.0)), out=folder / name)
    manifest = folder / "b-bad" / MANIFEST
    data = json.loads(manifest.read_text())
    data["source"] = source
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match=f"not a valid bundle manifest.*{message}"):
        read_bundle(folder / "b-bad")
    done = run_cli(["list", str(folder), "--no-hub-cache"], env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["a-good", "b-bad", "c-good"]
    assert "DAMAGED:" in lines[2] and message in lines[2] and "DAMAGED" not in lines[1] + lines[3]


@pytest.mark.quick
@pytest.mark.parametrize("change, message", [
    (lambda data: data | {"format_version": -5}, "format_version must be a version number from 1"),
    (lambda data: data | {"type": "NOTATYPE"}, "type \"NOTATYPE\" is not a GGUF type"),
    (lambda data: data | {"files": data["files"] * 2}, "is listed twice"),
    (lambda data: "[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
])
def test_manifests_that_cannot_be_right_are_refused_and_list_goes_on(tmp_path, monkeypatch, change, message):
    env = cli_env(tmp_path)
    monkeypatch.setenv("RANK1_LOCAL_HOME", env["RANK1_LOCAL_HOME"])
    folder = tmp_path / "bundles"
    for name in ("a-good", "b-bad"):
        pull(str(write_gguf(tmp_path / f"{name}-Q8_0.gguf", "Q8_0", 1.0)), out=folder / name)
    manifest = folder / "b-bad" / MANIFEST
    changed = change(json.loads(manifest.read_text()))
    manifest.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(CorruptFileError, match=message):
        read_bundle(folder / "b-bad")
    done = run_cli(["list", str(folder), "--no-hub-cache"], env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert "DAMAGED:" in lines[2] and "DAMAGED" not in lines[1]


@pytest.mark.quick
def test_a_link_to_a_file_outside_the_bundle_is_refused(tmp_path, monkeypatch):
    """Same bytes, same size, same digest: still not the bundle's own file (the bundle would change with it)."""
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    source = write_gguf(tmp_path / "m-Q8_0.gguf", "Q8_0", 1.0)
    bundle = pull(str(source), out=tmp_path / "b")
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(bundle.gguf.read_bytes())
    bundle.gguf.unlink()
    bundle.gguf.symlink_to(outside)
    with pytest.raises(CorruptFileError, match="a link to .*elsewhere.gguf, outside the bundle"):
        open_bundle(bundle.path)


def _swap_keeping_size_and_mtime(target: Path, replacement: bytes, *, in_place: bool) -> None:
    """What a hostile or careless hand does: other bytes, same size, modification time set back (touch -r)."""
    st = target.stat()
    assert len(replacement) == st.st_size
    if in_place:
        with open(target, "r+b") as f:
            f.write(replacement)
    else:
        new = target.with_name(target.name + ".new")
        new.write_bytes(replacement)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(new, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.quick
@pytest.mark.parametrize("in_place", [False, True], ids=["moved-over", "rewritten-in-place"])
def test_a_file_swapped_with_the_same_size_and_mtime_is_hashed_again(tmp_path, monkeypatch, in_place):
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    from rank1_local.models.file_digest import file_digest

    bundle = pull(str(write_gguf(tmp_path / "m-Q8_0.gguf", "Q8_0", 1.0)), out=tmp_path / "b")
    assert open_bundle(bundle.path) == bundle.gguf  # hashed once, remembered
    other = write_gguf(tmp_path / "other-Q8_0.gguf", "Q8_0", 2.0).read_bytes()
    _swap_keeping_size_and_mtime(bundle.gguf, other, in_place=in_place)
    with pytest.raises(CorruptFileError, match="does not match the bundle manifest"):
        open_bundle(bundle.path)
    assert file_digest(bundle.gguf) == hashlib.sha256(other).hexdigest()  # the judgment cache's key changes too


@pytest.mark.quick
def test_verify_always_hashes_on_every_use(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    from rank1_local.models.file_digest import file_digest

    bundle = pull(str(write_gguf(tmp_path / "m-Q8_0.gguf", "Q8_0", 1.0)), out=tmp_path / "b")
    with caplog.at_level(logging.INFO, logger="rank1_local.models.file_digest"):
        open_bundle(bundle.path)
        assert "hashing" not in caplog.text  # remembered
        monkeypatch.setenv("RANK1_LOCAL_VERIFY", "always")
        open_bundle(bundle.path)
        open_bundle(bundle.path)
    assert caplog.text.count("hashing m-Q8_0.gguf") == 2
    monkeypatch.setenv("RANK1_LOCAL_VERIFY", "sometimes")
    with pytest.raises(Rank1Error, match="RANK1_LOCAL_VERIFY='sometimes'"):
        file_digest(bundle.gguf)
    env = cli_env(tmp_path)
    (tmp_path / "docs.txt").write_text("a passage\n")
    done = run_cli(["rerank", "--model", str(bundle.path), "--query", "q", "--docs", str(tmp_path / "docs.txt"),
                    "--verify", "always"], env)  # the file is hashed, then llama.cpp refuses this toy GGUF
    assert "hashing m-Q8_0.gguf" in done.stderr and "Traceback" not in done.stderr, done.stderr


def _unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` as a user without root's power to read any file (a user namespace when the tests run as root)."""
    if os.geteuid() != 0:
        return cmd
    wrapped = ["unshare", "--user", "--map-user=1000", *cmd]
    if shutil.which("unshare") is None or subprocess.run([*wrapped[:3], "true"], capture_output=True).returncode:
        pytest.skip("running as root, and no user namespace to drop that in")
    return wrapped


@pytest.fixture
def open_dir():
    """A folder other users can enter (pytest's tmp_path is private to its owner)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="rank1-perm-"))
    folder.chmod(0o755)
    yield folder
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(folder)


@pytest.mark.quick
def test_an_unreadable_gguf_is_one_line_everywhere(open_dir):
    model = write_gguf(open_dir / "m-Q8_0.gguf", "Q8_0", 1.0)
    docs = open_dir / "docs.txt"
    docs.write_text("a passage\n")
    docs.chmod(0o644)
    env = {**cli_env(open_dir), "RANK1_LOCAL_HOME": str(open_dir / "home")}
    assert run_cli(["pull", str(model), "--out", str(open_dir / "b")], env).returncode == 0
    for p in (open_dir / "b").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    model.chmod(0)
    (open_dir / "b" / model.name).chmod(0)
    commands = [["rerank", "--model", str(model), "--query", "q", "--docs", str(docs)],
                ["rerank", "--model", str(open_dir / "b"), "--query", "q", "--docs", str(docs)],
                ["pull", str(model), "--out", str(open_dir / "b2")]]
    for args in commands:
        done = subprocess.run(_unprivileged([sys.executable, "-m", "rank1_local.cli.main", "-q", *args]),
                              capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=60,
                              cwd=ROOT)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "m-Q8_0.gguf: cannot be read (Permission denied)" in done.stderr, done.stderr


@pytest.mark.quick
def test_an_output_in_a_read_only_folder_is_refused_before_loading(open_dir):
    pairs = open_dir / "pairs.jsonl"
    pairs.write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "t"}) + "\n")
    pairs.chmod(0o644)
    locked = open_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env = {**cli_env(open_dir), "RANK1_LOCAL_HOME": str(open_dir / "home"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(_unprivileged([sys.executable, "-m", "rank1_local.cli.main", "-q", "rerank", "--model",
                                         "no-such.gguf", "--pairs", str(pairs), "--output",
                                         str(locked / "out.jsonl")]), capture_output=True, text=True, env=env,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "out.jsonl: cannot write there (Permission denied)" in done.stderr, done.stderr


# -- issue 33: the model card in the manifest ------------------------------------------------------------------------


def write_reranker_gguf(path: Path) -> Path:
    """A tiny Qwen3 GGUF whose metadata says Qwen3-Reranker (rank pooling, as our exporter and llama.cpp's converter
    write it), under a name that says nothing."""
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_file_type(LLAMA_FTYPES["Q8_0"])
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_tensor("t", np.full(16, 2.0, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.quick
def test_the_manifest_records_the_card_and_the_bundle_opens_under_it(tmp_path, monkeypatch):
    """``pull`` records the card (``--card``, else the one the GGUF shows); opening the bundle uses it unless
    ``card=`` names another; a manifest without one (made before cards were recorded) is recognised as before."""
    from rank1_local.backends.llama.facade import gguf_card
    from rank1_local.core.cards import QWEN3_RERANKER, RANK1

    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    plain = write_gguf(tmp_path / "plain-Q8_0.gguf", "Q8_0", 1.0)
    reranker = write_reranker_gguf(tmp_path / "model-Q8_0.gguf")
    recognised = {"plain": pull(str(plain), out=tmp_path / "plain"), "reranker": pull(str(reranker),
                                                                                      out=tmp_path / "reranker")}
    named = pull(str(plain), out=tmp_path / "named", card="Qwen3-Reranker")
    assert (recognised["plain"].card, recognised["reranker"].card, named.card) == ("rank1", "qwen3-reranker",
                                                                                   "qwen3-reranker")
    assert json.loads((named.path / MANIFEST).read_text())["card"] == "qwen3-reranker"
    assert read_bundle(named.path).card == "qwen3-reranker"
    assert gguf_card(named.gguf, None, named.path) is QWEN3_RERANKER  # the manifest's card, not recognition's
    assert gguf_card(named.gguf, None) is RANK1  # the same file alone
    assert gguf_card(named.gguf, "rank1", named.path) is RANK1  # card= overrides the manifest
    assert gguf_card(recognised["reranker"].gguf, None, recognised["reranker"].path) is QWEN3_RERANKER
    for bundle, want in ((recognised["plain"], RANK1), (recognised["reranker"], QWEN3_RERANKER)):
        manifest = bundle.path / MANIFEST
        data = json.loads(manifest.read_text())
        del data["card"]  # a manifest written before cards were recorded
        manifest.write_text(json.dumps(data))
        assert read_bundle(bundle.path).card is None and gguf_card(bundle.gguf, None, bundle.path) is want
    # pulling into such a bundle: the same card as it runs under is nothing to do; another card is another bundle
    before = (recognised["plain"].path / MANIFEST).read_bytes()
    assert pull(str(plain), out=tmp_path / "plain").card == "rank1"
    assert (recognised["plain"].path / MANIFEST).read_bytes() == before
    with pytest.raises(Rank1Error, match=r"already holds a different bundle \(Q8_0 from .*, card rank1\)"):
        pull(str(plain), out=tmp_path / "plain", card="qwen3-reranker")
    # pulling again with another card is another bundle: kept unless --force
    with pytest.raises(Rank1Error, match="already holds a different bundle .*card qwen3-reranker"):
        pull(str(plain), out=tmp_path / "named", card="rank1")
    assert pull(str(plain), out=tmp_path / "named", card="rank1", replace=True).card == "rank1"


@pytest.mark.quick
def test_a_card_the_gguf_contradicts_or_no_one_knows_is_refused(tmp_path, monkeypatch):
    from rank1_local.backends.llama.facade import gguf_card

    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    reranker = write_reranker_gguf(tmp_path / "model-Q8_0.gguf")
    with pytest.raises(Rank1Error, match=r"model-Q8_0.gguf: --card names the model card 'rank1', but the GGUF's "
                                         r"metadata shows a qwen3-reranker \(a qwen3 with rank pooling\)"):
        pull(str(reranker), out=tmp_path / "b", card="rank1")
    with pytest.raises(UnsupportedModelError, match="no model card 'bge'; the cards are: rank1"):
        pull(str(reranker), out=tmp_path / "b", card="bge")
    assert not (tmp_path / "b").exists()
    bundle = pull(str(reranker), out=tmp_path / "b")
    manifest = bundle.path / MANIFEST
    data = json.loads(manifest.read_text())
    for card, error, message in (
            ("rank1", CorruptFileError, r"rank1-bundle.json: the manifest names the model card 'rank1', but the "
                                        r"GGUF's metadata shows a qwen3-reranker .*; pass --card to choose one"),
            ("bge-reranker", UnsupportedModelError, r"the bundle's model card 'bge-reranker' is not one this "
                                                    r"rank1-local knows \(rank1, qwen3-reranker\)")):
        manifest.write_text(json.dumps(data | {"card": card}))
        with pytest.raises(error, match=message):
            gguf_card(bundle.gguf, None, bundle.path)
        assert gguf_card(bundle.gguf, "qwen3-reranker", bundle.path).name == "qwen3-reranker"  # --card decides
    manifest.write_text(json.dumps(data | {"card": 5}))
    with pytest.raises(CorruptFileError, match="not a valid bundle manifest .card must be a string, got int"):
        read_bundle(bundle.path)


@pytest.mark.quick
def test_pull_and_list_show_the_card(tmp_path):
    env = cli_env(tmp_path)
    reranker = write_reranker_gguf(tmp_path / "model-Q8_0.gguf")
    done = run_cli(["pull", str(reranker), "--out", str(tmp_path / "bundles" / "r")], env)
    assert done.returncode == 0, done.stderr
    assert "Q8_0, card qwen3-reranker, 1 file(s)" in done.stdout
    done = run_cli(["pull", str(reranker), "--card", "rank1", "--out", str(tmp_path / "bundles" / "x")], env)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr
    assert "shows a qwen3-reranker" in done.stderr and not (tmp_path / "bundles" / "x").exists()
    table = run_cli(["list", str(tmp_path / "bundles"), "--no-hub-cache"], env).stdout.splitlines()
    assert table[0].split() == ["KIND", "NAME", "TYPE", "CARD", "SIZE", "SOURCE", "PATH"]
    assert table[1].split()[:4] == ["bundle", "r", "Q8_0", "qwen3-reranker"]
    (row,) = json.loads(run_cli(["list", str(tmp_path / "bundles"), "--no-hub-cache", "--format", "json"], env).stdout)
    assert row["card"] == "qwen3-reranker"
