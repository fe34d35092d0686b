"""Shared fixtures: offline fixture checkpoints (cached across runs) and their GGUF exports.

Tests that need a fixture model skip, with the reason, when the ``reference`` extra (torch, transformers) that
builds them is not installed; the quick tier (``-m quick``) needs neither.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (fake_engine, rank1_reference)

HAVE_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
TIERS = ("vllm", "ray")  # the tiers whose engine must import where they are required (CI)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The llama.cpp build check (test_llama_build.py) runs first: a build whose CPU kernels crash would otherwise
    kill the session at the first test that decodes, before the check could name the cause."""
    items.sort(key=lambda item: item.path.name != "test_llama_build.py")  # stable: the rest keep their order


def pytest_addoption(parser):
    parser.addoption("--require", action="append", default=[], metavar="TIER",
                     help=f"a tier that must run ({', '.join(TIERS)}; repeat or comma-separate): its tests fail, "
                          "naming the import error, instead of skipping when its engine cannot be imported. CI=true "
                          "requires every tier a run selects.")


def _named_tiers(config) -> set[str]:
    return {t.strip() for option in config.getoption("require") for t in option.split(",") if t.strip()}


def pytest_configure(config):
    unknown = sorted(_named_tiers(config) - set(TIERS))
    if unknown:
        raise pytest.UsageError(f"--require: no tier {', '.join(unknown)} (tiers: {', '.join(TIERS)})")


def required(config, tier: str) -> bool:
    """Whether ``tier``'s tests must run here: ``--require`` names it, or ``CI`` is set (``CI=true``)."""
    return tier in _named_tiers(config) or os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A tier's tests (marked ``vllm`` or ``ray``) need its engine, checked before anything else is set up."""
    for tier in TIERS:
        if item.get_closest_marker(tier) is not None:
            engine(item.config, tier)


def engine(config, module: str):
    """``import module`` for a tier's tests (the tier is the module's top package): skip when it cannot be imported,
    or fail with the import error where the tier is :func:`required`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        tier = module.split(".")[0]
        if required(config, tier):
            pytest.fail(f"the {tier} tier must run here (CI or --require {tier}), but `import {module}` fails: "
                        f"{type(exc).__name__}: {exc}", pytrace=False)
        pytest.skip(f"`import {module}` fails: {exc}")


ROOT = Path(__file__).resolve().parents[1]
# The GPTQ/AWQ exports the main suite makes (tests/test_weight_quant.py) and keeps for the vLLM tests, and what makes
# them: the exporter's sources and its calibration data (with these arguments, their digest names the kept copy).
WEIGHT_QUANT_CALIBRATION = ("--calibration-size", "8", "--calibration-budget", "64")
WEIGHT_QUANT_EXPORTS = {"gptq": ("--bits", "4", "--group-size", "128"), "awq": ()}
EXPORTER_SOURCES = ("quantize/weight_quant.py", "quantize/calibration.py", "quantize/data")


def exporter_digest(root: Path = ROOT) -> str:
    """The digest of the GPTQ/AWQ exporter's sources (and the exports' arguments): a changed exporter gets exports of
    its own, never an older exporter's."""
    h = hashlib.sha256(json.dumps([WEIGHT_QUANT_CALIBRATION, WEIGHT_QUANT_EXPORTS], sort_keys=True).encode())
    for rel in EXPORTER_SOURCES:
        path = root / rel
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                h.update(f"{file.relative_to(root)}\0".encode())
                h.update(file.read_bytes())
    return h.hexdigest()[:12]


def weight_quant_cache(source: Path, root: Path = ROOT) -> Path:
    """Where the GPTQ/AWQ exports of fixture ``source`` made by the main suite are kept for the vLLM tests (whose
    virtualenv has no GPTQModel), under the exporter's digest."""
    from quantize.fixtures import fixture_cache_dir

    return fixture_cache_dir() / "weight-quant" / f"{source.name}-exporter-{exporter_digest(root)}"


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
def browser():
    """Headless Chromium for the ``browser`` tier (one for the session; see tests/browser_support.py)."""
    from browser_support import start_chromium, stop_chromium

    driver = start_chromium()
    yield driver
    stop_chromium(driver)


@pytest.fixture(scope="session")
def artifacts(request, tmp_path_factory):
    """The folder the browser tier's screenshots go to (printed)."""
    from browser_support import artifacts_folder

    return artifacts_folder(request, tmp_path_factory)


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig):
    """A local Ray cluster of 2 CPUs for the ``ray`` tests (each worker gets 1 thread); its address, for drivers in
    other processes. Ray is imported here, never at collection: the quick tier stays Ray-free."""
    ray = engine(pytestconfig, "ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
