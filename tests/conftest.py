"""Shared fixtures: offline fixture checkpoints (cached across runs) and their GGUF exports."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantize.fixtures import build_fixture, fixture_cache_dir
from quantize.gguf_export import export_gguf

RANDOM_FIXTURES = ["qwen2-tied", "qwen2-untied-sharded", "llama3", "mistral"]


@pytest.fixture(scope="session")
def fixture_dir():
    """fixture_dir(name) -> folder of a fixture checkpoint (built once, cached). A failed build is
    remembered for the session, so later tests fail at once instead of building it again."""
    failures: dict[str, Exception] = {}

    def get(name: str) -> Path:
        if name in failures:
            raise RuntimeError(f"fixture {name} failed to build earlier in this session") from failures[name]
        try:
            return build_fixture(name)
        except Exception as exc:
            failures[name] = exc
            raise

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, fixture_dir):
    """exported(name, type) -> path of the fixture's GGUF export, made once per session."""
    out = tmp_path_factory.mktemp("exports")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, gguf_type: str) -> Path:
        key = (name, gguf_type)
        if key not in made:
            (result,) = export_gguf(fixture_dir(name), out / name, gguf_type, progress=False,
                                    allow_no_imatrix=True)
            made[key] = result.path
        return made[key]

    return get


@pytest.fixture(scope="session")
def vocab_test_file():
    from quantize.fixtures.vocab_files import vocab_gguf_path

    return lambda name, suffix: vocab_gguf_path(name, fixture_cache_dir(), suffix)
