"""Reading documents and pair files; writing result rows incrementally and resumably.

Every input problem is an error naming the file and line, raised before anything slow starts. Text files are UTF-8
(a leading byte-order mark is dropped, as ``utf-8-sig`` does); lines end at ``\\n`` (``\\r\\n`` too) and nowhere else,
so a passage keeps any other separator it contains. A ``.tsv`` is tab-separated text, not CSV: quotes are kept as
they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Passage, make_passage

logger = logging.getLogger(__name__)

DOCUMENT_FORMATS = (".txt", ".jsonl", ".tsv")


@dataclass(frozen=True)
class PairRow:
    qid: str
    query: str
    docid: str
    text: str
    title: str | None = None
    instruction: str | None = None
    line: int = 0  # its line in the pairs file

    @property
    def passage(self) -> Passage:
        return make_passage(self.text, self.title)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise Rank1Error(f"{path}: no such file")
    if path.is_dir():
        raise Rank1Error(f"{path}: is a folder, expected a file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rank1Error(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise Rank1Error(f"{path}: cannot be read ({exc.strerror or exc})") from None


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) for each line, split at ``\\n`` only (a ``\\r`` before it is dropped)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        yield n, line.removesuffix("\r")


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads(text)``, or a :class:`Rank1Error` naming ``where`` for every way JSON can fail to load: malformed,
    nested too deep for the parser, or an integer with more digits than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Rank1Error(f"{where}: malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise Rank1Error(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # an integer over Python's digit limit
        raise Rank1Error(f"{where}: unreadable JSON ({str(exc).split(';')[0]})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in text_lines(_read_text(path)):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{n}")
        if not isinstance(row, dict):
            raise Rank1Error(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _id(path: Path, n: int, row: dict[str, Any], name: str) -> str:
    """An id field: a string or an integer (never null, a boolean, a number with a fraction or a list)."""
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise Rank1Error(f"{path}:{n}: {name} must be a non-empty string or an integer, got {_kind(value)} "
                         f"{json.dumps(value)[:40]}")
    return str(value)


def _text(path: Path, n: int, row: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = row.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise Rank1Error(f"{path}:{n}: {name} must be a string, got {_kind(value)}")
    return value


class _DocIds:
    """Document ids as they are read, each once: a repeated id is an error naming both lines (a ranking or a TREC
    run with one docid twice is ambiguous)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: list[str] = []
        self._lines: dict[str, int] = {}

    def add(self, docid: str, line: int) -> None:
        if docid in self._lines:
            raise Rank1Error(f"{self.path}:{line}: docid {docid!r} again (first on line {self._lines[docid]}); each "
                             "document needs its own id")
        self._lines[docid] = line
        self.ids.append(docid)


def _jsonl_documents(path: Path) -> tuple[list[str], list[Passage]]:
    ids = _DocIds(path)
    docs: list[Passage] = []
    for n, row in read_jsonl(path):
        if not isinstance(row.get("text"), str):
            raise Rank1Error(f"{path}:{n}: row has no 'text' string")
        title = _text(path, n, row, "title", optional=True)
        key = "docid" if "docid" in row else "id" if "id" in row else None
        ids.add(_id(path, n, row, key) if key else str(len(docs)), n)
        docs.append(make_passage(row["text"], title))
    return ids.ids, docs


def _tsv_documents(path: Path) -> tuple[list[str], list[Passage]]:
    ids = _DocIds(path)
    docs: list[Passage] = []
    tabs = False
    for n, line in text_lines(_read_text(path)):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) == 1:
            ids.add(str(len(docs)), n)
            docs.append(line)
            continue
        tabs = True
        if len(fields) > 3:
            raise Rank1Error(f"{path}:{n}: {len(fields)} tab-separated fields; a .tsv line is docid<TAB>text"
                             "[<TAB>title] (a passage cannot contain a tab)")
        if not fields[0].strip():
            raise Rank1Error(f"{path}:{n}: empty docid before the first tab")
        ids.add(fields[0].strip(), n)
        docs.append(make_passage(fields[1], fields[2] if len(fields) > 2 else None))
    if docs and not tabs:
        logger.warning("%s has no tab on any line: each line is read as one passage, with ids counted from 0 "
                       "(a .tsv line is docid<TAB>text[<TAB>title])", path)
    return ids.ids, docs


def _text_documents(path: Path) -> tuple[list[str], list[Passage]]:
    if path.suffix.lower() != ".txt":
        logger.warning("%s is not %s: read as plain text, one passage per line%s", path, "/".join(DOCUMENT_FORMATS),
                       " (not as CSV: use .tsv or .jsonl for ids and titles)" if path.suffix.lower() == ".csv" else "")
    docs: list[Passage] = []
    blank = 0
    for _, line in text_lines(_read_text(path)):
        if line.strip():
            docs.append(line)
        else:
            blank += 1
    if blank and docs:
        logger.warning("%s: %d blank line%s skipped; document ids count passages from 0, not lines", path, blank,
                       "" if blank == 1 else "s")
    return [str(i) for i in range(len(docs))], docs


def read_documents(path: Path) -> tuple[list[str], list[Passage]]:
    """Document ids and passages from .txt (one per line; blank lines skipped, ids count passages from 0), .jsonl
    (``text``[, ``title``, ``docid``]) or .tsv (``docid<TAB>text[<TAB>title]``); any other file is read as .txt."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        ids, docs = _jsonl_documents(path)
    elif suffix == ".tsv":
        ids, docs = _tsv_documents(path)
    else:
        ids, docs = _text_documents(path)
    if not docs:
        raise Rank1Error(f"{path}: no documents")
    return ids, docs


def read_pairs(path: Path) -> list[PairRow]:
    """Every row of a pairs file, each checked (types, a non-empty query, no repeated (qid, docid)); an error names
    the file line."""
    rows = []
    seen: dict[tuple[str, str], int] = {}
    for n, row in read_jsonl(path):
        missing = [k for k in ("qid", "query", "docid", "text") if k not in row]
        if missing:
            raise Rank1Error(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        query = _text(path, n, row, "query")
        assert query is not None
        if not query.strip():
            raise Rank1Error(f"{path}:{n}: query is empty")
        pair = PairRow(_id(path, n, row, "qid"), query, _id(path, n, row, "docid"), str(_text(path, n, row, "text")),
                       _text(path, n, row, "title", optional=True), _text(path, n, row, "instruction", optional=True),
                       line=n)
        if (pair.qid, pair.docid) in seen:
            raise Rank1Error(f"{path}:{n}: duplicated (qid, docid) ({pair.qid!r}, {pair.docid!r}) "
                             f"(first on line {seen[(pair.qid, pair.docid)]}); each pair is one row of the output")
        seen[(pair.qid, pair.docid)] = n
        rows.append(pair)
    if not rows:
        raise Rank1Error(f"{path}: no pairs")
    return rows


def _done_key(row: Any) -> tuple[str, str] | None:
    """(qid, docid) of a complete result row (its ids and a finite score), else None."""
    if not isinstance(row, dict):
        return None
    ids = [row.get("qid"), row.get("docid")]
    if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in ids):
        return None
    score = row.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return str(ids[0]), str(ids[1])


def done_keys(path: Path) -> set[tuple[str, str]]:
    """(qid, docid) already in an output file, to resume it.

    Only a torn last line (a crash in the middle of writing it: no newline after it) is dropped, and a complete last
    row that lacks its newline gets one. Any other line that is not a result row is an error naming the file and
    line, and the file is left exactly as it is. Blank lines are kept."""
    if not path.exists():
        return set()
    if path.is_dir():
        raise Rank1Error(f"{path}: is a folder; --output must be a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Rank1Error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    keys: set[tuple[str, str]] = set()
    lines = data.split(b"\n")
    offset = 0
    for i, raw in enumerate(lines):
        unterminated = i == len(lines) - 1
        if unterminated and not raw:
            break
        if raw.strip():
            try:
                key = _done_key(json.loads(raw))
            except (ValueError, UnicodeDecodeError, RecursionError):
                key = None
            if key is None and unterminated:
                logger.warning("%s: dropping its torn last line (%d bytes, a run interrupted while writing it)",
                               path, len(raw))
                _resize(path, offset)
                break
            if key is None:
                raise Rank1Error(f"{path}:{i + 1}: not a result row (qid, docid, score); a resumed output "
                                 "keeps every row, so fix or remove that line (or write to a new --output file)")
            keys.add(key)
            if unterminated:  # a complete row whose newline was not written: add it before appending
                _append_newline(path)
        offset += len(raw) + 1
    return keys


def _resize(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def _append_newline(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def check_writable(path: Path, what: str = "--output") -> None:
    """Refuse an output path that cannot be written — a folder, a missing or read-only folder, a read-only file —
    before anything slow starts. Nothing is left behind by the check."""
    if path.is_dir():
        raise Rank1Error(f"{path}: is a folder; {what} must be a file path")
    folder = path.parent if str(path.parent) else Path(".")
    probe_folder = folder
    while not probe_folder.exists() and probe_folder != probe_folder.parent:
        probe_folder = probe_folder.parent  # the folder would be created: its nearest existing parent decides
    if not probe_folder.is_dir():
        raise Rank1Error(f"{path}: {probe_folder} is not a folder")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
        probe = probe_folder / f".{path.name}.{os.getpid()}.probe"
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise Rank1Error(f"{path}: cannot write there ({exc.strerror or exc}); choose another {what}") from None


def check_output_folder(path: Path, what: str) -> None:
    """Refuse a folder option that names a file, or a place where no folder can be made or written, before anything
    slow starts (the folder is not created by the check)."""
    if path.exists() and not path.is_dir():
        raise Rank1Error(f"{path}: is a file; {what} is a folder (it is created if missing)")
    check_writable(path / ".rank1-probe", what)
