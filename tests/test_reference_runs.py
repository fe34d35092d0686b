"""Reference runs (`rank1-bench reference`): the transformers backend end to end against the llama.cpp runtime,
run headers, and the vLLM runner's parsing and import guard (vLLM itself cannot run here)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.cli import main as bench
from benchmarks.compare import compare_one
from benchmarks.runfile import read_run
from quantize.fixtures.synthetic_task import eval_pairs
from rank1_local.backends.vllm import Completion, read_output, reasoning_of
from rank1_local.cli.main import main as rerank
from rank1_local.runs.run_header import header_path, read_header

pytest.importorskip("transformers")
from rank1_reference import Reference  # noqa: E402

PAIRS = list({(p.query_word, p.passage_word): p for p in eval_pairs()[::4] + eval_pairs()[1::9]}.values())
SETTINGS = ["--max-think-tokens", "64", "--n-ctx", "512"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"qid": p.query_word, "query": p.query, "docid": p.passage_word,
                                        "text": p.passage}) + "\n" for p in PAIRS))
    return path


@pytest.fixture(scope="module")
def reference_run(fixture_dir, pairs_file):
    out = pairs_file.parent / "reference.jsonl"
    assert bench(["-q", "reference", "--model", str(fixture_dir("behaving")), "--pairs", str(pairs_file),
                  "--output", str(out), "--backend", "transformers", "--device", "cpu", *SETTINGS]) == 0
    return out


def test_transformers_reference_matches_runtime_f32(reference_run, pairs_file, exported):
    run = pairs_file.parent / "f32.jsonl"
    assert rerank(["-q", "rerank", "--model", str(exported("behaving", "F32")), "--pairs", str(pairs_file),
                   "--output", str(run), "--parallel", "4", "--threads", "2", *SETTINGS]) == 0
    r = compare_one(read_run(reference_run), read_run(run))
    assert r.common == len(PAIRS) and r.missing_in_run == r.extra_in_run == 0
    assert r.identical_reasoning == 1.0 and r.decision_agreement == 1.0
    assert r.max_abs_diff <= 1e-4
    ref_header, run_header = read_header(header_path(reference_run)), read_header(header_path(run))
    assert ref_header.backend == "transformers" and ref_header.device == "transformers cpu float32"
    assert run_header.backend == "llama.cpp" and run_header.pairs == len(PAIRS) and run_header.model_bytes > 0
    assert "transformers" in ref_header.versions and run_header.pairs_per_second > 0


def test_reference_run_is_the_independent_reference(reference_run, fixture_dir):
    """The transformers backend against the tests' own implementation of the protocol."""
    ref = Reference(fixture_dir("behaving"))
    rows = {(r["qid"], r["docid"]): r for r in map(json.loads, reference_run.read_text().splitlines())}
    for p in PAIRS[:6]:
        want = ref.score(p.query, p.passage, max_think_tokens=64)
        got = rows[(p.query_word, p.passage_word)]
        assert got["reasoning"] == want.reasoning and got["n_tokens"] == want.n_tokens
        assert abs(got["score"] - want.score) <= 1e-5


def test_transformers_forced_path_matches_reference(fixture_dir):
    from rank1_local.backends.hf import TransformersRank1

    ref = Reference(fixture_dir("behaving"))
    with TransformersRank1(fixture_dir("behaving"), device="cpu", max_think_tokens=12, n_ctx=512) as model:
        got = model.score_pairs([(p.query, p.passage) for p in PAIRS[:3]])
    for p, g in zip(PAIRS[:3], got, strict=True):
        want = ref.score(p.query, p.passage, max_think_tokens=12)
        assert g.forced == want.forced and g.n_tokens == want.n_tokens == 12
        assert abs(g.score - want.score) <= 1e-5


def test_resuming_with_another_model_is_refused(reference_run, pairs_file, exported, tmp_path, capsys):
    partial = tmp_path / "partial.jsonl"
    partial.write_text(reference_run.read_text().splitlines()[0] + "\n")
    header_path(partial).write_text(header_path(reference_run).read_text())
    assert rerank(["-q", "rerank", "--model", str(exported("behaving", "F32")), "--pairs", str(pairs_file),
                   "--output", str(partial), *SETTINGS]) == 2
    assert "was started with another model" in capsys.readouterr().err
    assert len(partial.read_text().splitlines()) == 1  # nothing appended


def test_duplicated_pairs_are_refused(tmp_path, capsys):
    pairs = tmp_path / "dup.jsonl"
    row = json.dumps({"qid": "1", "query": "q", "docid": "a", "text": "t"})
    pairs.write_text(f"{row}\n{row}\n")
    assert bench(["-q", "reference", "--model", "x/y", "--pairs", str(pairs), "--output", str(tmp_path / "o.jsonl"),
                  "--max-think-tokens", "8", "--n-ctx", "64"]) == 2
    assert "dup.jsonl:2: duplicated (qid, docid) ('1', 'a') (first on line 1)" in capsys.readouterr().err


TRUE, FALSE = 830, 895


def test_vllm_output_reading():
    lp = math.log
    closed = Completion([1, 2, TRUE], "\nThe end.", [{1: 0.0}, {2: 0.0}, {TRUE: lp(0.6), FALSE: lp(0.2), 7: lp(0.1)}],
                        "</think> true")
    assert read_output(closed, TRUE, FALSE) == pytest.approx(0.75) and reasoning_of(closed.text) == "\nThe end."
    one_answer = Completion([1, TRUE], "x", [{1: 0.0}, {TRUE: lp(0.9)}])
    assert read_output(one_answer, TRUE, FALSE) is None  # false not in the top 20: the fallback decides
    assert read_output(Completion([], "", []), TRUE, FALSE) is None
    assert reasoning_of("a.</think>\ntrue") == "a."
