"""How the packages depend on each other, and what the runtime may import (quick tier)."""

from __future__ import annotations

import ast
import ctypes
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import rank1_local
from rank1_local.backends.llama.engine import set_fields
from rank1_local.core.errors import Rank1Error

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rank1_local", "quantize", "benchmarks")
ALLOWED = {"benchmarks": {"benchmarks", "quantize", "rank1_local"}, "quantize": {"quantize", "rank1_local"},
           "rank1_local": {"rank1_local"}}


# rank1_local's layers, innermost first: a module imports only its own layer and those before it (``version`` is
# open to all; the package's ``__init__`` re-exports the public API and is not a layer)
LAYERS = ("core", "runs", "models", "cache", "pipeline", "backends", "server", "integrations", "cli")


def imported_modules(path: Path) -> set[str]:
    """The dotted names of our modules a module imports anywhere in its body (lazy imports inside functions
    included); ``from a.b import c`` counts as ``a.b.c`` so that importing a sub-module is seen."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            graph[package] |= {n.split(".")[0] for n in imported_modules(path)} - {package}
    return graph


def layer_of(module: str) -> str | None:
    """The layer of a dotted ``rank1_local`` module name (None for the package itself and ``version``)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "rank1_local" or parts[1] in ("version", "__init__"):
        return None
    return parts[1] if parts[1] in LAYERS else parts[1] + "?"


def layer_graph() -> dict[str, set[str]]:
    """layer -> the layers its modules import."""
    graph: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for path in (ROOT / "rank1_local").rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        own = layer_of(".".join(relative.parts))
        if own is None:
            continue
        assert own in LAYERS, f"{relative}: not in a layer ({', '.join(LAYERS)})"
        graph[own] |= {layer for m in imported_modules(path) if (layer := layer_of(m)) is not None} - {own}
    return graph


def test_packages_import_one_way():
    graph = import_graph()
    for package, uses in graph.items():
        assert uses <= ALLOWED[package], f"{package} imports {sorted(uses - ALLOWED[package])}"
    assert graph["benchmarks"] >= {"quantize", "rank1_local"} and graph["quantize"] == {"rank1_local"}


def test_layers_import_inwards_only():
    graph = layer_graph()
    for layer, uses in graph.items():
        inner = set(LAYERS[:LAYERS.index(layer)])
        assert uses <= inner, f"rank1_local.{layer} imports {sorted(uses - inner)} (layers: {' <- '.join(LAYERS)})"
    assert graph["core"] == set(), "the core imports no other layer"
    # the package root only re-exports: nothing inside the package imports it (no cycle hidden by lazy imports)
    for path in (ROOT / "rank1_local").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            root_import = (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "rank1_local") or \
                (isinstance(node, ast.Import) and any(a.name == "rank1_local" for a in node.names))
            assert not root_import, f"{path.relative_to(ROOT)}:{node.lineno} imports the package root"


# the callers that must serve every backend: they speak to the engine interface (core.engine, pipeline), never to one
# backend's modules (a backend is opened by name through rank1_local.backends' registry)
ENGINE_CALLERS = ("rank1_local/server", "rank1_local/integrations/ray_serve.py", "rank1_local/runs/run_file.py",
                  "rank1_local/runs/run_output.py", "rank1_local/integrations/ray_run_file.py")


def test_servers_and_run_files_use_only_the_engine_interface():
    for entry in ENGINE_CALLERS:
        target = ROOT / entry
        for path in [target] if target.is_file() else sorted(target.rglob("*.py")):
            backends = {p.stem for p in (ROOT / "rank1_local" / "backends").iterdir() if p.stem != "__init__"}
            per_backend = sorted(m for m in imported_modules(path)
                                 if m.startswith("rank1_local.backends.") and m.split(".")[2] in backends)
            assert not per_backend, f"{path.relative_to(ROOT)} imports {per_backend}"


def test_runtime_imports_no_torch():
    modules = ["rank1_local", "rank1_local.cli.main", "rank1_local.backends", "rank1_local.backends.hf",
               "rank1_local.backends.vllm", "rank1_local.runs.run_file", "rank1_local.integrations.ray",
               "rank1_local.cli.ray_commands"]
    code = f"import sys; import {', '.join(modules)}; " \
           "bad = [m for m in ('torch', 'transformers', 'vllm', 'quantize', 'ray', 'pyarrow') if m in sys.modules]; " \
           "print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_version_is_written_once():
    assert metadata.version("rank1-local") == rank1_local.__version__
    project = (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0]
    assert 'dynamic = ["version"]' in project and "\nversion =" not in project


def test_unknown_ctypes_field_is_an_error_not_a_silent_attribute():
    class Params(ctypes.Structure):
        _fields_ = [("n_ctx", ctypes.c_uint32), ("kv_unified", ctypes.c_bool)]

    params = Params()
    set_fields(params, n_ctx=4, kv_unified=True)
    assert params.n_ctx == 4 and params.kv_unified
    with pytest.raises(Rank1Error, match="no Params field.s. kv_unfied"):
        set_fields(params, kv_unfied=True)


def test_llama_cpp_structs_have_every_field_we_set():
    import llama_cpp

    cparams = llama_cpp.llama_context_default_params()
    set_fields(cparams, n_ctx=8, n_batch=8, n_ubatch=8, n_seq_max=2, kv_unified=True, n_threads=1,
               n_threads_batch=1, no_perf=True, type_k=0, type_v=0)
    set_fields(llama_cpp.llama_model_default_params(), n_gpu_layers=0, vocab_only=True)


def test_llama_backend_is_initialised_once(monkeypatch):
    import llama_cpp

    from rank1_local.backends.llama import engine as llama_engine

    calls = []
    monkeypatch.setattr(llama_cpp, "llama_backend_init", lambda: calls.append(1))
    llama_engine.llama_cpp_module.cache_clear()
    try:
        assert llama_engine.llama_cpp_module() is llama_engine.llama_cpp_module() is llama_cpp
        assert calls == [1]
    finally:
        llama_engine.llama_cpp_module.cache_clear()


def test_llama_cpp_log_levels_follow_ggml_h():
    """llama.cpp's log reaches Python logging at its own level: its load chatter (INFO) stays out of sight, a
    warning is a warning (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)."""
    import logging

    from rank1_local.backends.llama.logs import _LineJoiner

    joiner = _LineJoiner()
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append((record.levelno, record.getMessage()))

    handler = Catch()
    logger = logging.getLogger("llama.cpp")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        joiner.feed(2, "llama_model_loader: loaded meta data\n")
        joiner.feed(3, "control-looking token: ")
        joiner.feed(5, "'<x>' was not control-type\n")
        joiner.feed(4, "failed to decode\n")
        joiner.feed(3, "n_ctx_seq (37120) > n_ctx_train (32768) -- possible training context overflow\n")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == [(logging.DEBUG, "llama_model_loader: loaded meta data"),
                    (logging.WARNING, "control-looking token: '<x>' was not control-type"),
                    (logging.ERROR, "failed to decode"),
                    (logging.DEBUG, "n_ctx_seq (37120) > n_ctx_train (32768) -- possible training context overflow")]


@pytest.mark.parametrize("user, expected", [({}, {"GOMP_SPINCOUNT": "SPIN"}),
                                            ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
                                            ({"GOMP_SPINCOUNT": "5"}, {"GOMP_SPINCOUNT": "5"})])
def test_llama_cpp_threads_wait_briefly_unless_the_user_says_otherwise(user, expected):
    """The waiting default is in the environment before llama.cpp's OpenMP runtime loads (it reads it once, then);
    a user's own setting stays."""
    from rank1_local.backends.llama.threads import SPIN_COUNT, WAIT_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES} | user
    code = ("import os, sys; from rank1_local.backends.llama.engine import llama_cpp_module; llama_cpp_module(); "
            "import json; print(json.dumps({k: os.environ[k] for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT') "
            "if k in os.environ}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    import json

    assert json.loads(out.stdout) == {k: (SPIN_COUNT if v == "SPIN" else v) for k, v in expected.items()}
