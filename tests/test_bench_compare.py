"""`rank1-bench compare` on hand-made run files whose answers were worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.cli import main
from benchmarks.compare import compare_one, read_qrels
from benchmarks.runfile import read_run
from rank1_local.core.errors import Rank1Error

REF = {("q1", "a"): 0.9, ("q1", "b"): 0.6, ("q1", "c"): 0.2, ("q1", "d"): 0.1, ("q2", "x"): 0.8, ("q2", "y"): 0.3}
RUN = {("q1", "a"): 0.8, ("q1", "b"): 0.4, ("q1", "c"): 0.3, ("q1", "d"): 0.05, ("q2", "x"): 0.7, ("q2", "y"): 0.9}
QRELS = "q1 0 a 1\nq1 0 c 2\nq2 0 y 1\n"


def _write(path, scores, reasoning=None, tokens=10, forced=()):
    reasoning = reasoning or {}
    path.write_text("".join(json.dumps({"qid": q, "docid": d, "score": s, "relevant": s > 0.5,
                                        "reasoning": reasoning.get((q, d), "abc def"), "n_tokens": tokens,
                                        "forced": (q, d) in forced}) + "\n" for (q, d), s in scores.items()))
    return path


@pytest.fixture
def files(tmp_path):
    ref = _write(tmp_path / "ref.jsonl", REF)
    run = _write(tmp_path / "run.jsonl", RUN, reasoning={("q1", "b"): "abc dXf", ("q2", "y"): "xbc def"}, tokens=12,
                 forced={("q2", "y")})
    qrels = tmp_path / "qrels.txt"
    qrels.write_text(QRELS)
    return ref, run, qrels


def test_known_answers(files):
    ref, run, qrels = files
    r = compare_one(read_run(ref), read_run(run), qrels=read_qrels(qrels))
    assert r.common == 6 and r.missing_in_run == r.extra_in_run == 0
    assert r.decision_agreement == pytest.approx(4 / 6)  # b and y flip
    assert r.mean_abs_diff == pytest.approx(1.15 / 6) and r.max_abs_diff == pytest.approx(0.6)
    assert r.kendall_tau == pytest.approx(0.0)  # q1: same order (+1), q2: swapped (-1)
    assert r.top10_overlap == pytest.approx(1.0) and r.queries == 2
    assert r.identical_reasoning == pytest.approx(4 / 6)
    assert r.median_divergence == pytest.approx(2.5) and r.divergence_unit == "characters"  # chars 5 and 0
    assert r.mean_tokens_reference == 10 and r.mean_tokens_run == 12
    assert r.forced_reference == 0 and r.forced_run == pytest.approx(1 / 6)
    # nDCG@10 with linear gains (trec_eval): q1 ref a,b,c,d -> (1 + 2/log2 4) / (2 + 1/log2 3);
    # q2 ref x,y -> (1/log2 3) / 1; the run ranks y first in q2 -> 1.0
    q1 = 2 / (2 + 1 / math.log2(3))
    assert r.ndcg10_reference == pytest.approx((q1 + 1 / math.log2(3)) / 2, abs=1e-6)
    assert r.ndcg10_run == pytest.approx((q1 + 1.0) / 2, abs=1e-6)
    assert r.ndcg10_delta == pytest.approx(r.ndcg10_run - r.ndcg10_reference)
    s = [0.9, 0.6, 0.2, 0.1, 0.8, 0.3], [0.8, 0.4, 0.3, 0.05, 0.7, 0.9]
    mean = [sum(x) / 6 for x in s]
    cov = sum((a - mean[0]) * (b - mean[1]) for a, b in zip(*s, strict=True))
    var = [sum((a - m) ** 2 for a in x) for x, m in zip(s, mean, strict=True)]
    assert r.pearson == pytest.approx(cov / math.sqrt(var[0] * var[1]))


def test_tokenized_divergence(files):
    ref, run, _ = files
    r = compare_one(read_run(ref), read_run(run), tokenize=lambda text: text.split())
    assert r.divergence_unit == "tokens" and r.median_divergence == pytest.approx(0.5)  # words 1 and 0


def test_run_against_itself_is_perfect(files):
    ref, _, qrels = files
    r = compare_one(read_run(ref), read_run(ref), qrels=read_qrels(qrels))
    assert r.decision_agreement == 1.0 and r.max_abs_diff == 0.0 and r.kendall_tau == 1.0
    assert r.pearson == pytest.approx(1.0) and r.spearman == pytest.approx(1.0)
    assert r.identical_reasoning == 1.0 and r.median_divergence is None and r.ndcg10_delta == 0.0


def test_rows_on_one_side_are_reported(tmp_path, files):
    ref, _, _ = files
    partial = dict(RUN)
    del partial[("q1", "d")]
    partial[("q3", "z")] = 0.5
    run = _write(tmp_path / "partial.jsonl", partial)
    r = compare_one(read_run(ref), read_run(run))
    assert (r.common, r.missing_in_run, r.extra_in_run) == (5, 1, 1)
    assert r.missing_examples == [("q1", "d")] and r.extra_examples == [("q3", "z")]


def test_cli_writes_markdown_json_and_plot(files, tmp_path, capsys):
    ref, run, qrels = files
    partial = _write(tmp_path / "partial.jsonl", {k: v for k, v in RUN.items() if k != ("q2", "x")})
    out = tmp_path / "report"
    assert main(["-q", "compare", str(ref), str(run), str(partial), "--qrels", str(qrels), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| run |" in printed and "66.7%" in printed and "ΔnDCG@10" in printed
    assert "1 reference rows missing" in printed
    data = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["run", "partial"]
    assert data["runs"][1]["missing_in_run"] == 1
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_an_html_page_with_every_pair(files, tmp_path):
    """compare.html: the table, the plot inline, and each run's pairs with both chains (b and y flip; b and y have
    other chains, diverging at characters 5 and 0)."""
    from browser_support import page_pairs

    ref, run, qrels = files
    out = tmp_path / "report"
    assert main(["-q", "compare", str(ref), str(run), "--qrels", str(qrels), "--out-dir", str(out)]) == 0
    page = out / "compare.html"
    text = page.read_text()
    assert "data:image/png;base64," in text and "<td data-sort=\"66.7\">66.7%</td>" in text
    data = page_pairs(page)
    (listed,) = data["runs"]
    assert (listed["label"], listed["total"], listed["flips"], listed["forced"], listed["differ"]) == ("run", 6, 2, 1, 2)
    pairs = {(p["q"], p["d"]): p for p in listed["pairs"]}
    assert data["strings"][pairs[("q1", "b")]["rb"]] == "abc dXf" and data["strings"][pairs[("q1", "b")]["ra"]] == "abc def"
    assert (pairs[("q1", "b")]["v"], pairs[("q2", "y")]["v"], pairs[("q1", "a")]["v"]) == (5, 0, None)


@pytest.mark.parametrize("content, message", [
    ("", "empty run file"),
    ('{"qid": "1", "docid": "a", "score": 0.5, "reasoning": "", "n_tokens": 1, "forced": false}\n{oops\n',
     "bad.jsonl:2: malformed JSON"),
    ('{"qid": "1", "docid": "a", "score": 0.5, "reasoning": "", "n_tokens": 1, "forced": false}\n'
     '{"qid": "1", "docid": "a", "score": 0.7, "reasoning": "", "n_tokens": 1, "forced": false}\n',
     "bad.jsonl:2: duplicated (qid, docid) ('1', 'a') (first on line 1)"),
    ('{"qid": "1", "docid": "a", "score": 0.5}\n', "bad.jsonl:1: missing field(s) reasoning, n_tokens, forced"),
    ('{"qid": "1", "docid": "a", "score": 1.5, "reasoning": "", "n_tokens": 1, "forced": false}\n',
     "score must be a number between 0 and 1"),
    ('[1, 2]\n', "bad.jsonl:1: expected a JSON object"),
])
def test_bad_run_files(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(Rank1Error, match=None) as err:
        read_run(bad)
    assert message in str(err.value)


def test_cli_errors_are_plain(files, tmp_path, capsys):
    ref, _, _ = files
    assert main(["-q", "compare", str(ref), str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such run file" in err and "Traceback" not in err
    assert main(["-q", "compare", str(ref), str(ref), "--qrels", str(tmp_path / "nope.txt")]) == 2
    assert "no such qrels file" in capsys.readouterr().err
    disjoint = _write(tmp_path / "disjoint.jsonl", {("q9", "z"): 0.5})
    assert main(["-q", "compare", str(ref), str(disjoint)]) == 2
    assert "no (qid, docid) in common" in capsys.readouterr().err
