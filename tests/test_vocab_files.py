"""The fixtures' tokenizer vocabulary comes from llama-cpp-python's source distribution: fetched once, saying why and
showing its progress, from pip's cache when pip has it, or from a local copy with no index at all (quick tier: a
package index on localhost serves a small stand-in for the sdist)."""

from __future__ import annotations

import functools
import http.server
import logging
import os
import tarfile
import threading
from importlib import metadata
from pathlib import Path

import pytest

from quantize.fixtures.vocab_files import SUFFIXES, VOCAB_DIR_ENV, VOCAB_NAMES, pip_has_raw_progress, vocab_gguf_path

pytestmark = pytest.mark.quick


def stand_in_sdist(folder: Path, version: str) -> Path:
    """A source distribution named as llama-cpp-python's, holding its vocabulary files (random bytes: big enough that
    pip reports its download) and metadata pip can read without a build back end from the index."""
    root = folder / "src" / f"llama_cpp_python-{version}"
    models = root / "vendor" / "llama.cpp" / "models"
    models.mkdir(parents=True)
    for name in VOCAB_NAMES:
        for suffix in SUFFIXES:
            (models / f"ggml-vocab-{name}.gguf{suffix}").write_bytes(os.urandom(400_000) if not suffix else b"x\n")
    (root / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                         f'"setuptools.build_meta"\n[project]\nname = "llama_cpp_python"\nversion = '
                                         f'"{version}"\n[tool.setuptools]\npy-modules = []\n')
    (folder / "index" / "llama-cpp-python").mkdir(parents=True)
    archive = folder / "index" / "llama-cpp-python" / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    (folder / "index" / "llama-cpp-python" / "index.html").write_text(
        f'<html><body><a href="{archive.name}">{archive.name}</a></body></html>')
    return archive


class IndexHandler(http.server.SimpleHTTPRequestHandler):
    """Files served as PyPI serves them: cacheable for a year (so pip keeps them in its cache)."""

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "max-age=31536000, public")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip pointed at a package index on localhost (and nothing else: no config file, its own cache)."""
    version = metadata.version("llama-cpp-python")
    archive = stand_in_sdist(tmp_path, version)
    handler = functools.partial(IndexHandler, directory=str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "127.0.0.1")  # pip caches what a trusted (or https) index serves
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "false")  # the stand-in's metadata with this environment's setuptools
    monkeypatch.delenv(VOCAB_DIR_ENV, raising=False)
    yield archive, server
    server.shutdown()
    server.server_close()


def test_the_sdist_is_fetched_once_with_a_progress_bar_saying_why(local_index, tmp_path, caplog, capsys):
    archive, _ = local_index
    with caplog.at_level(logging.INFO, logger="quantize.fixtures.vocab_files"):
        path = vocab_gguf_path("qwen2", tmp_path / "cache", progress=True)
    assert path == tmp_path / "cache" / "vocab" / "ggml-vocab-qwen2.gguf" and path.stat().st_size == 400_000
    assert "fetching it once from the package index" in caplog.text and VOCAB_DIR_ENV in caplog.text
    if pip_has_raw_progress():
        assert "llama-cpp-python source distribution" in capsys.readouterr().err  # the bar
    caplog.clear()
    path.unlink()  # asked again: pip's cache has it
    with caplog.at_level(logging.DEBUG, logger="quantize.fixtures.vocab_files"):
        vocab_gguf_path("qwen2", tmp_path / "cache")
    assert "came from pip's cache" in caplog.text, caplog.text
    assert (tmp_path / "cache" / "vocab" / "ggml-vocab-llama-bpe.gguf.out").read_bytes() == b"x\n"


def test_a_local_sdist_needs_no_index(local_index, tmp_path, monkeypatch, caplog):
    archive, server = local_index
    server.shutdown()  # no index any more
    server.server_close()
    monkeypatch.setenv(VOCAB_DIR_ENV, str(archive.parent))
    with caplog.at_level(logging.INFO, logger="quantize.fixtures.vocab_files"):
        path = vocab_gguf_path("llama-bpe", tmp_path / "cache")
    assert path.stat().st_size == 400_000 and "package index" not in caplog.text


def test_no_index_and_no_copy_says_what_to_do(local_index, tmp_path, capsys):
    from rank1_local.core.errors import ModelNotFoundError

    _, server = local_index
    server.shutdown()
    server.server_close()
    with pytest.raises(ModelNotFoundError, match=f"set {VOCAB_DIR_ENV} to the folder holding llama_cpp_python-"):
        vocab_gguf_path("qwen2", tmp_path / "cache")
