"""How results are shown: the ``--docs`` table, json/jsonl rows, TREC lines, and the one function every output uses
to turn a result into a row (quick tier: hand-made results)."""

from __future__ import annotations

import json

import pytest

from rank1_local.cli.output import print_results, score_digits, shorten
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result, build_result, judgment_fields, result_dict

pytestmark = pytest.mark.quick

FIELDS = {"score", "relevant", "reasoning", "n_tokens", "forced", "truncated", "too_long", "cached", "n_prompt_tokens"}


def result(index: int, score: float, **kw) -> Rank1Result:
    pair = PreparedPair(index, "q", "prompt", [1, 2, 3], passage_tokens_dropped=kw.pop("dropped", 0),
                        too_long=kw.pop("too_long", False))
    return build_result(pair, score=score, reasoning=f"because {index}", n_tokens=7, forced=kw.pop("forced", False),
                        seconds=0.1, cached=kw.pop("cached", False))


def test_scores_print_with_enough_digits_to_rank():
    assert score_digits([0.5, 0.25]) == 4
    close = [0.99999999991, 0.99999999997, 0.3]
    digits = score_digits(close)
    assert len({f"{s:.{digits}f}" for s in close}) == 3 and len({f"{s:.4f}" for s in close}) == 2


def test_the_table_has_a_header_marks_cut_text_and_ranks_visibly(capsys):
    results = [result(1, 0.999999991), result(0, 0.999999990, forced=True), result(2, 0.1, cached=True)]
    docs = ["short one", "x" * 200, {"title": "T", "text": "titled passage"}]
    print_results(results, ["a", "b", "c"], docs, "table")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RANK", "SCORE", "DOCID", "TEXT", "FLAGS"]
    first, second = lines[1].split(), lines[2].split()
    assert first[0] == "1" and first[2] == "b" and first[3].endswith("…") and len(first[3]) == 70
    assert second[2] == "a" and second[-1] == "forced"
    assert float(first[1]) > float(second[1])  # different scores never print as equals
    assert lines[3].split()[-2:] == ["passage", "cached"] and "titled passage" in lines[3]
    assert shorten("a\nb  c") == "a b c"


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_rows_carry_rank_and_every_flag(capsys, fmt):
    results = [result(1, 0.9, dropped=3), result(0, 0.5, too_long=True)]
    print_results(results, ["a", "b"], ["p0", "p1"], fmt)
    out = capsys.readouterr().out
    rows = json.loads(out) if fmt == "json" else [json.loads(line) for line in out.splitlines()]
    assert [(r["rank"], r["docid"]) for r in rows] == [(1, "b"), (2, "a")]
    assert all(FIELDS <= set(r) for r in rows)
    assert rows[0]["truncated"] and rows[1]["too_long"] and not rows[0]["too_long"]


def test_trec_lines_keep_the_ranking(capsys):
    print_results([result(0, 0.1234567891), result(1, 0.1234567890)], ["a", "b"], ["p", "p"], "trec", qid="7")
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[2] for row in lines] == ["a", "b"] and float(lines[0][4]) > float(lines[1][4])


def test_every_output_uses_the_same_fields():
    r = result(0, 0.75, cached=True)
    row = result_dict(r, qid="q", docid="d")
    assert list(row)[:2] == ["qid", "docid"] and set(row) == FIELDS | {"qid", "docid"} and row["cached"]
    pytest.importorskip("fastapi")
    from rank1_local.server.schema import RerankRequest, result_row

    request = RerankRequest(query="q", documents=["p"], return_reasoning=True)
    server_row = result_row(request, r, reasoning=True)
    assert {k: server_row[k] for k in judgment_fields(r)} == judgment_fields(r)
    assert server_row["relevance_score"] == r.score


def test_the_passage_shape_is_built_in_one_place():
    pytest.importorskip("fastapi")
    from rank1_local.core.pairs import make_passage
    from rank1_local.runs.inputs import PairRow
    from rank1_local.server.schema import RerankRequest

    request = RerankRequest(query="q", documents=[{"text": "t", "title": "T"}, {"text": "t", "title": ""}, "t"])
    assert request.passages == [make_passage("t", "T"), make_passage("t", ""), "t"] == [{"title": "T", "text": "t"},
                                                                                        "t", "t"]
    assert PairRow("q", "x", "d", "t", "T").passage == make_passage("t", "T")


def test_validation_messages_have_no_pydantic_prefix():
    pytest.importorskip("fastapi")
    from pydantic import ValidationError

    from rank1_local.server.app import _summarize
    from rank1_local.server.schema import RerankRequest

    with pytest.raises(ValidationError) as info:
        RerankRequest.model_validate({"query": "q", "documents": ["a"], "texts": ["b"]})
    assert "Value error, " in str(info.value)  # what pydantic says …
    message = _summarize(info.value)  # … and what the client reads
    assert message == "invalid request: give the documents as `documents` (Cohere, Jina) or `texts` (TEI), one of them"
