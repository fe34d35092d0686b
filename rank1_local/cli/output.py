"""How ``rank1-local rerank --docs`` prints its ranking: a table for people, json/jsonl rows, or TREC run lines."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rank1_local.core.pairs import Passage, passage_text
from rank1_local.core.reranker import PREFILTER_STAGE
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
    """One line per result; a cascade's table says which stage scored each (STAGE)."""
    digits = score_digits([r.score for r in results])
    staged = any(r.stage is not None for r in results)
    rows = [("RANK", "SCORE", *(("STAGE",) if staged else ()), "DOCID", "TEXT", "FLAGS")]
    rows += [(str(rank), f"{r.score:.{digits}f}", *((r.stage or "",) if staged else ()), ids[r.index],
              shorten(passage_text(docs[r.index])), flags(r)) for rank, r in enumerate(results, 1)]
    n = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    align = (str.rjust, *(str.ljust,) * (n - 1))
    return ["  ".join([*(align[i](row[i], widths[i]) for i in range(n)), row[n]]).rstrip() for row in rows]


def trec_score(result: Rank1Result) -> float:
    """The score a TREC run line carries: the result's own, except below a cascade's cut, where it is the prefilter's
    minus 2, so that tools ranking by score (trec_eval) keep the cascade's order (every score is in [0, 1])."""
    return result.score - 2.0 if result.stage == PREFILTER_STAGE else result.score


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
        scores = [trec_score(r) for r in results]
        digits = max(6, score_digits(scores))
        for row, score in zip(rows, scores):
            print(f"{qid} Q0 {row['docid']} {row['rank']} {score:.{digits}f} rank1-local")
    else:
        raise ValueError(f"unknown format {fmt!r}")
