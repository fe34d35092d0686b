"""Shared fixtures: offline fixture checkpoints (cached across runs) and their GGUF exports.

Tests that need a fixture model skip, with the reason, when the ``reference`` extra (torch, transformers) that
builds them is not installed; the quick tier (``-m quick``) needs neither.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (fake_engine, rank1_reference)

HAVE_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def weight_quant_cache(source: Path) -> Path:
    """Where the GPTQ/AWQ exports of fixture ``source`` made by the main suite are kept for the vLLM tests."""
    from quantize.fixtures import fixture_cache_dir

    return fixture_cache_dir() / "weight-quant" / source.name


@pytest.fixture(scope="session")
def fixture_dir():
    """fixture_dir(name) -> folder of a fixture checkpoint (built once, cached). A failed build is
    remembered for the session, so later tests fail at once instead of building it again."""
    if not HAVE_REFERENCE:
        pytest.skip("fixture models are built with the reference extra: pip install 'rank1-local[reference]'")
    from quantize.fixtures import build_fixture

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
    from quantize.gguf_export import export_gguf

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
def converted_by_llama_cpp(tmp_path_factory):
    """converted_by_llama_cpp(folder, outtype) -> the GGUF llama.cpp's own converter (``convert_hf_to_gguf.py`` from
    the llama-cpp-python sdist) makes of a checkpoint folder, made once per session. Skips without sentencepiece,
    which the converter imports."""
    if not HAVE_REFERENCE:
        pytest.skip("llama.cpp's converter needs torch and transformers: pip install 'rank1-local[reference]'")
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("llama.cpp's converter imports sentencepiece: pip install sentencepiece")
    from quantize.fixtures import fixture_cache_dir
    from quantize.fixtures.llama_cpp_sdist import convert_with_llama_cpp

    out = tmp_path_factory.mktemp("llama-cpp-converted")
    made: dict[tuple[Path, str], Path] = {}

    def get(folder: Path, outtype: str) -> Path:
        key = (Path(folder), outtype)
        if key not in made:
            made[key] = convert_with_llama_cpp(Path(folder), out / f"{Path(folder).name}-{outtype}.gguf", outtype,
                                               cache_dir=fixture_cache_dir())
        return made[key]

    return get


@pytest.fixture(scope="session")
def vocab_test_file(fixture_dir):
    from quantize.fixtures import fixture_cache_dir
    from quantize.fixtures.vocab_files import vocab_gguf_path

    return lambda name, suffix: vocab_gguf_path(name, fixture_cache_dir(), suffix)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the ``ray`` tests (each worker gets 1 thread); its address, for drivers in
    other processes. Ray is imported here, never at collection: the quick tier stays Ray-free."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
