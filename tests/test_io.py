"""Reading documents, pairs and calibration files; resumable output (quick tier)."""

from __future__ import annotations

import json
import re

import pytest

from quantize.calibration import load_calibration
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.runs.inputs import check_writable, done_keys, read_documents, read_pairs
from rank1_local.runs.run_output import RunOutput

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
    ('{"docid": null, "text": "t"}\n', "d.jsonl:1: docid must be"),
    ('{"text": "t", "title": 7}\n', "d.jsonl:1: title must be a string"),
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
    with RunOutput(out) as run:
        run.append({"qid": "q", "docid": str(i), "score": 0.5} for i in range(3))
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


# -- damaged and surprising inputs (issue 20 and 21): each is refused with the file and line, or read as written ----


def test_a_tsv_passage_starting_with_a_quote_keeps_every_row_and_its_quotes(tmp_path):
    tsv = tmp_path / "q.tsv"
    tsv.write_text('d1\t"quoted start text\nd2\tsecond doc\nd3\t"Hello," she said\td3 title\n')
    assert read_documents(tsv) == (["d1", "d2", "d3"], ['"quoted start text', "second doc",
                                                         {"title": "d3 title", "text": '"Hello," she said'}])
    tsv.write_text("d1\tone\nd2\ttwo\tt\tx\n")
    with pytest.raises(Rank1Error, match="q.tsv:2: 4 tab-separated fields"):
        read_documents(tsv)
    tsv.write_text("d1\tone\n\ttwo\n")
    with pytest.raises(Rank1Error, match="q.tsv:2: empty docid"):
        read_documents(tsv)


@pytest.mark.parametrize("suffix, content, expected", [
    (".txt", "first\nsecond\n", (["0", "1"], ["first", "second"])),
    (".tsv", "d1\tfirst\nd2\tsecond\n", (["d1", "d2"], ["first", "second"])),
    (".jsonl", '{"docid": "d1", "text": "first"}\n', (["d1"], ["first"])),
])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix, content, expected):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert read_documents(path) == expected
    pairs = tmp_path / "p.jsonl"
    pairs.write_bytes(b"\xef\xbb\xbf" + json.dumps({"qid": "q", "query": "x", "docid": "d", "text": "t"}).encode())
    assert read_pairs(pairs)[0].qid == "q"


def test_passages_keep_separators_other_than_newline(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("one\u2028still one\x0cand one\r\ntwo\n", newline="")
    assert read_documents(txt)[1] == ["one\u2028still one\x0cand one", "two"]


def test_files_read_as_plain_text_say_so(tmp_path, caplog):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("no tab here\nnor here\n")
    with caplog.at_level("WARNING"):
        assert read_documents(tsv) == (["0", "1"], ["no tab here", "nor here"])
    assert "has no tab on any line" in caplog.text
    caplog.clear()
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\nc,d\n")
    with caplog.at_level("WARNING"):
        assert read_documents(csv)[1] == ["a,b", "c,d"]
    assert "read as plain text" in caplog.text and "not as CSV" in caplog.text
    caplog.clear()
    txt = tmp_path / "d.txt"
    txt.write_text("first\n\n\nsecond\n")
    with caplog.at_level("WARNING"):
        assert read_documents(txt) == (["0", "1"], ["first", "second"])
    assert "2 blank lines skipped; document ids count passages from 0" in caplog.text


@pytest.mark.parametrize("line, message", [
    ('{"qid": null, "query": "q", "docid": "a", "text": "t"}', "p.jsonl:2: qid must be a non-empty string or an "
                                                                "integer, got null"),
    ('{"qid": "1", "query": 5, "docid": "a", "text": "t"}', "p.jsonl:2: query must be a string, got int"),
    ('{"qid": "1", "query": null, "docid": "a", "text": "t"}', "p.jsonl:2: query must be a string, got null"),
    ('{"qid": "1", "query": "q", "docid": "a", "text": ["t"]}', "p.jsonl:2: text must be a string, got list"),
    ('{"qid": "1", "query": "q", "docid": [1], "text": "t"}', "p.jsonl:2: docid must be"),
    ('{"qid": "1", "query": "q", "docid": "a", "text": "t", "title": 3}', "p.jsonl:2: title must be a string"),
    ('{"qid": "1", "query": "  ", "docid": "a", "text": "t"}', "p.jsonl:2: query is empty"),
    ('[1, 2]', "p.jsonl:2: expected a JSON object, got list"),
])
def test_pair_rows_of_the_wrong_type_name_their_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"qid": "0", "query": "q", "docid": "z", "text": "t"}\n' + line + "\n")
    with pytest.raises(Rank1Error, match=re.escape(message)):
        read_pairs(path)


def test_a_passage_mapping_without_text_is_refused():
    from rank1_local.core.pairs import Pair, prepare_pairs

    def tokenize(text):
        return list(text.encode())

    with pytest.raises(Rank1Error, match="passage of pair 1 is a mapping without a 'text' string"):
        prepare_pairs([Pair("q", "fine"), Pair("q", {"title": "t"})], ScoringConfig(), tokenize, bytes.decode)


def _rows(n):
    return b"".join(json.dumps({"qid": "q", "docid": str(i), "score": 0.5}).encode() + b"\n" for i in range(n))


def test_a_last_row_without_its_newline_is_kept_and_closed(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_bytes(_rows(4)[:-1])  # the fourth row's newline never reached the disk
    assert done_keys(out) == {("q", str(i)) for i in range(4)}
    assert out.read_bytes() == _rows(4)  # no NUL byte, nothing cut: the row is whole and ends its line
    with RunOutput(out, force_resume=True) as run:  # rows without a header: kept because we say so
        run.append([{"qid": "q", "docid": "4", "score": 0.5}])
    assert done_keys(out) == {("q", str(i)) for i in range(5)} and out.read_bytes() == _rows(5)


@pytest.mark.parametrize("bad", [b"edited by hand\n", b"[1, 2]\n", b'{"qid": "q"}\n', b'{"qid": null, "docid": 1}\n'])
def test_a_bad_line_before_the_last_is_an_error_and_the_file_is_kept(tmp_path, bad):
    out = tmp_path / "o.jsonl"
    content = _rows(2) + bad + _rows(3)[len(_rows(2)):]
    out.write_bytes(content)
    with pytest.raises(Rank1Error, match=r"o.jsonl:3: not a result row"):
        done_keys(out)
    assert out.read_bytes() == content


def test_blank_lines_are_kept_and_do_not_move_the_cut(tmp_path):
    out = tmp_path / "o.jsonl"
    content = b"\n" + _rows(2) + b"\n\n" + _rows(3)[len(_rows(2)):]
    out.write_bytes(content + b'{"qid": "q", "docid": "3", "sc')
    assert done_keys(out) == {("q", "0"), ("q", "1"), ("q", "2")}
    assert out.read_bytes() == content


def test_output_paths_that_cannot_be_written_are_refused_first(tmp_path):
    with pytest.raises(Rank1Error, match="is a folder; --output must be a file path"):
        check_writable(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(Rank1Error, match="is not a folder"):
        check_writable(blocker / "out.jsonl")
    check_writable(tmp_path / "new" / "sub" / "out.jsonl")  # folders to be made: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the check leaves nothing behind


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", '{"docid": "d1", "text": "a"}\n{"docid": "d2", "text": "b"}\n{"docid": "d1", "text": "c"}\n',
     r"d.jsonl:3: docid 'd1' again \(first on line 1\)"),
    ("d.tsv", "d1\ta\nd1\tb\n", r"d.tsv:2: docid 'd1' again \(first on line 1\)"),
    ("d.jsonl", '{"id": 7, "text": "a"}\n{"id": "7", "text": "b"}\n', r"d.jsonl:2: docid '7' again"),
])
def test_a_docid_given_twice_is_refused(tmp_path, name, content, message):
    """A ranking (or a TREC run) with one docid twice is ambiguous."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(Rank1Error, match=message):
        read_documents(path)


@pytest.mark.parametrize("line, message", [
    ("[" * 200_000 + "]" * 200_000, "JSON nested too deeply to read"),
    ('{"qid": ' + "9" * 5000 + ', "query": "q", "docid": "d", "text": "t"}', "unreadable JSON"),
])
def test_json_no_parser_can_hold_is_one_line(tmp_path, line, message):
    """Nested 200k deep, or an integer of 5000 digits: an error naming the file line, never a traceback."""
    for reader, name in ((read_pairs, "p.jsonl"), (read_documents, "d.jsonl")):
        path = tmp_path / name
        path.write_text(line + "\n")
        with pytest.raises(Rank1Error, match=rf"{name}:1: {message}"):
            reader(path)
