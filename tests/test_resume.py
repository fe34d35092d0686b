"""Resuming a run file: every check that needs no model happens before the model loads, names what differs, and
never touches rows already written (quick tier: the model is never loaded, which is the point)."""

from __future__ import annotations

import json
import logging

import pytest

from rank1_local.cli.main import main
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.reranker import Reranker
from rank1_local.runs.run_file import score_pairs_file
from rank1_local.runs.run_header import RunHeader, header_path, write_header

pytestmark = pytest.mark.quick

CONFIG = ScoringConfig(max_think_tokens=64, n_ctx=512)


def never_loaded():
    raise AssertionError("the model was loaded although a check without it had to refuse the run")


@pytest.fixture
def run(tmp_path):
    """A pairs file of three pairs, and a run file holding the first two, made by ``m.gguf`` with CONFIG."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"qid": "q", "query": "x", "docid": f"d{i}", "text": "t"}) + "\n"
                             for i in range(3)))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"qid": "q", "docid": f"d{i}", "score": 0.5}) + "\n" for i in range(2)))
    write_header(header_path(out), RunHeader(model=str(model), model_file=str(model), model_bytes=64,
                                             backend="llama.cpp", device="CPU", settings=CONFIG.to_dict()))
    return model, pairs, out


@pytest.mark.parametrize("complete", [False, True])
def test_other_settings_are_refused_before_loading_and_named(run, complete):
    model, pairs, out = run
    if complete:
        with open(out, "a") as f:
            f.write(json.dumps({"qid": "q", "docid": "d2", "score": 0.5}) + "\n")
    before = out.read_bytes()
    other = ScoringConfig(max_think_tokens=32, n_ctx=512)
    with pytest.raises(Rank1Error, match=r"max_think_tokens: 64 in the file, 32 now") as info:
        score_pairs_file(pairs, out, never_loaded, model_arg=str(model), backend="llama.cpp",
                         settings=other.to_dict(), progress=False)
    assert "n_ctx" not in str(info.value)  # only what differs
    assert out.read_bytes() == before


def test_another_model_is_refused_before_loading(run, tmp_path):
    _, pairs, out = run
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(Rank1Error, match=r"model: .*m.gguf in the file, .*other.gguf now"):
        score_pairs_file(pairs, out, never_loaded, model_arg=str(other), backend="llama.cpp",
                         settings=CONFIG.to_dict(), progress=False)
    with pytest.raises(Rank1Error, match=r"backend: llama.cpp in the file, transformers now"):
        score_pairs_file(pairs, out, never_loaded, model_arg=str(run[0]), backend="transformers",
                         settings=CONFIG.to_dict(), progress=False)


def test_the_same_file_by_another_path_resumes(run, tmp_path, monkeypatch, caplog):
    model, pairs, out = run
    monkeypatch.chdir(tmp_path)

    class Loaded(Exception):
        pass

    def loaded():
        raise Loaded

    with caplog.at_level(logging.INFO, logger="rank1_local.runs.run_file"), pytest.raises(Loaded):
        score_pairs_file(pairs, out, loaded, model_arg="./m.gguf", backend="llama.cpp", settings=CONFIG.to_dict(),
                         progress=False)
    assert "resuming" in caplog.text and "2 rows kept, 1 of 3 pairs left to score" in caplog.text


def test_the_cli_names_the_setting_before_looking_for_the_model(run, capsys):
    _, pairs, out = run
    run[0].unlink()  # a missing model would be the next error: the header check comes first
    assert main(["-q", "rerank", "--model", str(run[0]), "--pairs", str(pairs), "--output", str(out),
                 "--max-think-tokens", "128", "--n-ctx", "512"]) == 2
    err = capsys.readouterr().err
    assert "max_think_tokens: 64 in the file, 128 now" in err and "Traceback" not in err
    assert "{" not in err  # no settings dicts dumped


class Failing(Reranker):
    """A model whose scoring fails at once (as a prompt the tokenizer refuses would)."""

    config = CONFIG
    device = "nowhere"

    def score_pairs(self, pairs, *, config=None, on_result=None):
        raise Rank1Error("the query of pair 0 leaves no room")

    def _close_backend(self) -> None:
        pass


def test_a_run_that_writes_nothing_leaves_nothing_behind(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "t"}) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(Rank1Error, match="leaves no room"):
        score_pairs_file(pairs, out, Failing, model_arg="m.gguf", backend="llama.cpp", progress=False)
    assert not out.exists() and not header_path(out).exists()


def test_bad_rows_and_bad_outputs_are_refused_before_loading(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "t"}) + "\n" +
                     json.dumps({"qid": "q", "query": ["x"], "docid": "e", "text": "t"}) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(Rank1Error, match="pairs.jsonl:2: query must be a string, got list"):
        score_pairs_file(pairs, out, never_loaded, model_arg="m.gguf", backend="llama.cpp", progress=False)
    assert not out.exists()
    pairs.write_text(json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "t"}) + "\n")
    assert main(["-q", "rerank", "--model", "m.gguf", "--pairs", str(pairs), "--output", str(tmp_path)]) == 2
    assert "is a folder; --output must be a file path" in capsys.readouterr().err
