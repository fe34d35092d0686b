"""Reading documents, pairs and calibration files; resumable output (quick tier)."""

from __future__ import annotations

import json

import pytest

from quantize.calibration import load_calibration
from rank1_local.core.errors import Rank1Error
from rank1_local.runs.inputs import JsonlAppender, done_keys, read_documents, read_pairs

pytestmark = pytest.mark.quick


def test_documents_in_three_formats(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("first passage\n\nsecond passage\n")
    assert read_documents(txt) == (["0", "1"], ["first passage", "second passage"])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"docid": "a", "title": "T", "text": "body"}) + "\n" + json.dumps({"text": "x"}))
    assert read_documents(jsonl) == (["a", "1"], [{"title": "T", "text": "body"}, "x"])
    tsv = tmp_path / "d.tsv"
    tsv.write_text("d1\tbody one\n d2\tbody two\tTitle\n")
    assert read_documents(tsv)[1] == ["body one", {"title": "Title", "text": "body two"}]


@pytest.mark.parametrize("content, message", [
    ("", "no documents"),
    ('{"docid": 1}\n', "d.jsonl:1: row has no 'text'"),
    ("{oops\n", "d.jsonl:1: malformed JSON"),
    ("[1, 2]\n", "d.jsonl:1: expected a JSON object"),
])
def test_bad_documents(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(Rank1Error, match=message):
        read_documents(path)


def test_bad_pairs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"qid": 1, "query": "q", "docid": "a"}\n')
    with pytest.raises(Rank1Error, match="p.jsonl:1: missing field.s. text"):
        read_pairs(path)
    row = json.dumps({"qid": 1, "query": "q", "docid": "a", "text": "t"})
    path.write_text(f"{row}\n{row}\n")
    with pytest.raises(Rank1Error, match="p.jsonl:2: duplicated"):
        read_pairs(path)
    path.write_bytes(b'{"qid": 1, "query": "\xff"}\n')
    with pytest.raises(Rank1Error, match="not valid UTF-8"):
        read_pairs(path)


def test_torn_last_line_is_dropped_and_rows_kept(tmp_path):
    out = tmp_path / "o.jsonl"
    appender = JsonlAppender(out)
    for i in range(3):
        appender.write({"qid": "q", "docid": str(i), "score": 0.5})
    appender.close()
    with open(out, "ab") as f:
        f.write(b'{"qid": "q", "docid": "3", "sco')
    assert done_keys(out) == {("q", "0"), ("q", "1"), ("q", "2")}
    assert out.read_text().count("\n") == 3 and out.read_text().endswith("}\n")


@pytest.mark.parametrize("content, message", [
    ('{"qid": 1, "docid": 2, "query": "q"}\n', r"cal.jsonl:1: calibration row lacks text"),
    ('{"qid": 1, "docid": 2, "query": "q", "text": "t"}\n{broken\n', r"cal.jsonl:2: malformed JSON"),
    ('{"qid": 1, "docid": 2, "query": 5, "text": "t"}\n', "must be strings"),
])
def test_malformed_calibration_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "cal.jsonl"
    path.write_text(content)
    with pytest.raises(Rank1Error, match=message):
        load_calibration(path)


def test_packaged_calibration_set():
    pairs = load_calibration()
    assert len(pairs) == 32 and all(p.query and p.text for p in pairs)
    assert len(load_calibration(limit=5)) == 5
