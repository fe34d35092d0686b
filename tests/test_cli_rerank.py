"""`rank1-local rerank` end to end on the behaving fixture."""

from __future__ import annotations

import json

import pytest

from quantize.fixtures.synthetic_task import eval_pairs
from rank1_local.cli.main import main
from rank1_local.runs.run_header import header_path

PAIRS = eval_pairs()[:8]
COMMON = ["--max-think-tokens", "64", "--n-ctx", "512", "--threads", "2"]


@pytest.fixture(scope="module")
def model(exported):
    return str(exported("behaving", "Q8_0"))


def test_rerank_docs_table_and_trec(model, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(p.passage for p in PAIRS[:4]) + "\n")
    assert main(["-q", "rerank", "--model", model, "--query", PAIRS[0].query, "--docs", str(docs), *COMMON]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RANK", "SCORE", "DOCID", "TEXT", "FLAGS"]
    assert len(table) == 5 and table[1].split()[2] == "0"  # doc 0 (same word) ranks first
    assert main(["-q", "rerank", "--model", model, "--query", PAIRS[0].query, "--docs", str(docs), "--format",
                 "trec", "--qid", "42", *COMMON]) == 0
    trec = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in trec] == ["42"] * 4 and trec[0][2] == "0" and trec[0][3] == "1"


def test_rerank_jsonl_docs_with_titles(model, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"docid": f"d{i}", "title": "", "text": p.passage})
                              for i, p in enumerate(PAIRS[:3])))
    assert main(["-q", "rerank", "--model", model, "--query", PAIRS[0].query, "--docs", str(docs),
                 "--format", "json", *COMMON]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["docid"] == "d0" and rows[0]["relevant"] and "reasoning" in rows[0]
    assert [r["rank"] for r in rows] == [1, 2, 3] and all({"truncated", "too_long", "cached"} <= set(r) for r in rows)


def test_docs_mode_shows_progress_unless_quiet(model, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(p.passage for p in PAIRS[:3]) + "\n")
    args = ["rerank", "--model", model, "--query", PAIRS[0].query, "--docs", str(docs), "--format", "trec", *COMMON]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "3/3" in err and "doc" in err  # the bar, on stderr
    assert main(["-q", *args]) == 0
    assert "3/3" not in capsys.readouterr().err


def _pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"qid": f"q{i // 4}", "query": p.query, "docid": f"d{i}",
                                          "text": p.passage}) for i, p in enumerate(PAIRS)) + "\n")
    return path


def test_pairs_output_is_resumable(model, tmp_path):
    pairs = _pairs_file(tmp_path)
    full = tmp_path / "full.jsonl"
    assert main(["-q", "rerank", "--model", model, "--pairs", str(pairs), "--output", str(full),
                 "--parallel", "1", *COMMON]) == 0
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert len(rows) == len(PAIRS)
    assert set(rows[0]) >= {"qid", "docid", "score", "relevant", "reasoning", "n_tokens", "forced"}

    # a run that died after three rows, in the middle of writing the fourth
    part = tmp_path / "part.jsonl"
    lines = full.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:3]) + lines[3][:20])
    header_path(part).write_bytes(header_path(full).read_bytes())  # written first, so a killed run has it
    assert main(["-q", "rerank", "--model", model, "--pairs", str(pairs), "--output", str(part),
                 "--parallel", "1", *COMMON]) == 0
    assert part.read_bytes() == full.read_bytes()
    # re-running a finished file changes nothing
    assert main(["-q", "rerank", "--model", model, "--pairs", str(pairs), "--output", str(part), *COMMON]) == 0
    assert part.read_bytes() == full.read_bytes()


def test_a_warm_pairs_run_says_what_the_cache_served(model, tmp_path, capsys, caplog):
    pairs = _pairs_file(tmp_path)
    cache = tmp_path / "c.sqlite3"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    args = ["rerank", "--model", model, "--pairs", str(pairs), "--cache", str(cache), *COMMON]
    assert main(["-q", *args, "--output", str(first)]) == 0
    with caplog.at_level("INFO"):
        assert main([*args, "--output", str(second)]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in second.read_text().splitlines()]
    assert all(row["cached"] for row in rows) and not any(json.loads(line)["cached"]
                                                          for line in first.read_text().splitlines())
    assert f"{len(PAIRS)} of {len(PAIRS)} pairs already judged" in caplog.text
    assert f"cached={len(PAIRS)}" in err and "tok_s=0.0" not in err


def test_cli_errors_are_plain(model, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"qid": "1", "query": "q", "docid": "a", "text": "t"}\n{not json\n')
    assert main(["-q", "rerank", "--model", model, "--pairs", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:2: malformed JSON" in err and "Traceback" not in err
    docs = tmp_path / "docs.txt"
    docs.write_text("one passage\n")
    assert main(["-q", "rerank", "--model", str(tmp_path / "none.gguf"), "--query", "q", "--docs", str(docs)]) == 2
    assert "no such file" in capsys.readouterr().err
