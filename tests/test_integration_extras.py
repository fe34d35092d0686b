"""Each framework integration names the pip extra that provides its framework when the framework is missing, and the
runtime never imports any of them (quick tier: the frameworks are blocked, not imported)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from rank1_local.core.extras import MissingExtraError

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]
INTEGRATIONS = [("langchain", "langchain_core", "langchain"), ("llama_index", "llama_index", "llama-index"),
                ("haystack", "haystack", "haystack"), ("pyterrier", "pyterrier", "pyterrier")]


@pytest.mark.parametrize("module, framework, extra", INTEGRATIONS)
def test_a_missing_framework_names_its_extra(module, framework, extra, monkeypatch):
    for name in [m for m in sys.modules if m == framework or m.startswith(framework + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, framework, None)  # import fails as if it were not installed
    monkeypatch.delitem(sys.modules, f"rank1_local.integrations.{module}", raising=False)
    with pytest.raises(MissingExtraError, match=rf"pip install 'rank1-local\[{extra}\]'"):
        importlib.import_module(f"rank1_local.integrations.{module}")


def test_a_server_client_without_httpx_names_its_extra(monkeypatch):
    from rank1_local.integrations.client import Rank1Client

    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'rank1-local\[client\]'"):
        Rank1Client("http://127.0.0.1:8080")


def test_the_runtime_and_the_client_import_no_framework():
    code = ("import sys, rank1_local, rank1_local.cli.main, rank1_local.integrations.client; "
            "print([m for m in ('langchain_core', 'llama_index', 'haystack', 'pyterrier', 'httpx', "
            "'sentence_transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
