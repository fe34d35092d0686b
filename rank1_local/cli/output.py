"""How ``rank1-local rerank --docs`` prints its ranking: a table for people, json/jsonl rows, or TREC run lines."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rank1_local.core.pairs import Passage, passage_text
from rank1_local.core.results import Rank1Result, result_dict

TEXT_WIDTH = 70
MIN_DIGITS, MAX_DIGITS = 4, 17


def score_digits(scores: Sequence[float]) -> int:
    """The fewest decimals (at least 4) at which scores that differ also print differently, so the printed column
    ranks as the scores do."""
    distinct = set(scores)
    for digits in range(MIN_DIGITS, MAX_DIGITS):
        if len({f"{s:.{digits}f}" for s in distinct}) == len(distinct):
            return digits
    return MAX_DIGITS


def shorten(text: str, width: int = TEXT_WIDTH) -> str:
    """One line of at most ``width`` characters; cut text ends in "…"."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1].rstrip() + "…"


def flags(result: Rank1Result) -> str:
    return " ".join(name for name, on in (("forced", result.forced), ("truncated", result.truncated),
                                          ("too-long", result.too_long), ("cached", result.cached)) if on)


def table(results: Sequence[Rank1Result], ids: Sequence[str], docs: Sequence[Passage]) -> list[str]:
    digits = score_digits([r.score for r in results])
    rows = [("RANK", "SCORE", "DOCID", "TEXT", "FLAGS")]
    rows += [(str(rank), f"{r.score:.{digits}f}", ids[r.index], shorten(passage_text(docs[r.index])), flags(r))
             for rank, r in enumerate(results, 1)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    align = (str.rjust, str.ljust, str.ljust, str.ljust)
    return ["  ".join([*(align[i](row[i], widths[i]) for i in range(4)), row[4]]).rstrip() for row in rows]


def print_results(results: Sequence[Rank1Result], ids: Sequence[str], docs: Sequence[Passage], fmt: str, *,
                  qid: str = "q1") -> None:
    """Print ``results`` (best first) in ``fmt``: table, json, jsonl or trec."""
    if fmt == "table":
        print("\n".join(table(results, ids, docs)))
        return
    rows = [result_dict(r, rank=rank, docid=ids[r.index]) for rank, r in enumerate(results, 1)]
    if fmt == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif fmt == "jsonl":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    elif fmt == "trec":  # trec_eval orders by score: as many digits as ranking needs
        digits = max(6, score_digits([r.score for r in results]))
        for row in rows:
            print(f"{qid} Q0 {row['docid']} {row['rank']} {row['score']:.{digits}f} rank1-local")
    else:
        raise ValueError(f"unknown format {fmt!r}")
