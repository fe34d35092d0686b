"""Reading documents and pair files; writing result rows incrementally and resumably."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.core.results import Rank1Result


@dataclass(frozen=True)
class PairRow:
    qid: str
    query: str
    docid: str
    text: str
    title: str | None = None
    instruction: str | None = None

    @property
    def passage(self) -> str | dict[str, str]:
        return {"title": self.title, "text": self.text} if self.title else self.text


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise Rank1Error(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Rank1Error(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Rank1Error(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise Rank1Error(f"{path}:{n}: expected a JSON object")
        yield n, row


def read_documents(path: Path) -> tuple[list[str], list[str | dict[str, str]]]:
    """Document ids and passages from .txt (one per line), .jsonl (text[, title, docid]) or .tsv."""
    suffix = path.suffix.lower()
    ids: list[str] = []
    docs: list[str | dict[str, str]] = []
    if suffix == ".jsonl":
        for n, row in read_jsonl(path):
            if not isinstance(row.get("text"), str):
                raise Rank1Error(f"{path}:{n}: row has no 'text'")
            ids.append(str(row.get("docid", row.get("id", len(ids)))))
            docs.append({"title": row["title"], "text": row["text"]} if row.get("title") else row["text"])
    elif suffix == ".tsv":
        for n, rec in enumerate(csv.reader(_read_text(path).splitlines(), delimiter="\t"), 1):
            if not rec:
                continue
            if len(rec) == 1:
                ids.append(str(len(ids)))
                docs.append(rec[0])
            else:
                ids.append(rec[0])
                docs.append({"title": rec[2], "text": rec[1]} if len(rec) > 2 and rec[2] else rec[1])
    else:
        for line in _read_text(path).splitlines():
            if line.strip():
                ids.append(str(len(ids)))
                docs.append(line)
    if not docs:
        raise Rank1Error(f"{path}: no documents")
    return ids, docs


def read_pairs(path: Path) -> list[PairRow]:
    rows = []
    seen: dict[tuple[str, str], int] = {}
    for n, row in read_jsonl(path):
        missing = [k for k in ("qid", "query", "docid", "text") if k not in row]
        if missing:
            raise Rank1Error(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        pair = PairRow(str(row["qid"]), row["query"], str(row["docid"]), row["text"], row.get("title"),
                       row.get("instruction"))
        if (pair.qid, pair.docid) in seen:
            raise Rank1Error(f"{path}:{n}: duplicated (qid, docid) ({pair.qid!r}, {pair.docid!r}) "
                             f"(first on line {seen[(pair.qid, pair.docid)]}); each pair is one row of the output")
        seen[(pair.qid, pair.docid)] = n
        rows.append(pair)
    if not rows:
        raise Rank1Error(f"{path}: no pairs")
    return rows


def result_row(qid: str, docid: str, result: Rank1Result) -> dict[str, Any]:
    return {"qid": qid, "docid": docid, "score": result.score, "relevant": result.relevant,
            "reasoning": result.reasoning, "n_tokens": result.n_tokens, "forced": result.forced,
            "truncated": result.truncated, "too_long": result.too_long}


def done_keys(path: Path) -> set[tuple[str, str]]:
    """(qid, docid) already in an output file; a torn last line (crash mid-write) is dropped."""
    if not path.exists():
        return set()
    keys = set()
    lines = path.read_bytes().split(b"\n")
    good = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keys.add((str(row["qid"]), str(row["docid"])))
            good += len(line) + 1
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            break  # everything after a torn line is discarded below
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return keys


class JsonlAppender:
    """Appends one JSON row per line, flushed and fsynced, so a crash loses at most the row in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
