"""A run against the reference, pair by pair: what the HTML reports of ``rank1-bench study`` and ``compare`` list.

:func:`pair_views` gives one :class:`PairView` per (qid, docid) both runs hold: both scores, both reasoning chains,
token counts, forced answers, and where the chains first differ; :func:`select_pairs` picks the ones a report lists
when there are too many to list them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.runfile import Run
from rank1_local.core.protocol import common_prefix_len

MAX_LISTED = 2000  # pairs a report lists per run (every flip, forced answer and differing chain first)


@dataclass(frozen=True)
class PairView:
    """One pair of a run against the reference. ``divergence`` is the first position (token, or character without a
    tokenizer) where the two chains differ; None when they are the same."""

    qid: str
    docid: str
    reference_score: float
    run_score: float
    reference_reasoning: str
    run_reasoning: str
    reference_tokens: int
    run_tokens: int
    reference_forced: bool
    run_forced: bool
    divergence: int | None

    @property
    def flipped(self) -> bool:
        return (self.reference_score > 0.5) != (self.run_score > 0.5)

    @property
    def abs_diff(self) -> float:
        return abs(self.run_score - self.reference_score)

    @property
    def forced(self) -> bool:
        return self.reference_forced or self.run_forced


def pair_views(ref: Run, run: Run, tokenize: Callable[[str], list[int]] | None = None) -> list[PairView]:
    """Every pair both runs hold, in (qid, docid) order."""
    views = []
    for key in sorted(set(ref.rows) & set(run.rows)):
        a, b = ref.rows[key], run.rows[key]
        divergence = None
        if a.reasoning != b.reasoning:
            divergence = common_prefix_len(tokenize(a.reasoning), tokenize(b.reasoning)) if tokenize \
                else common_prefix_len(a.reasoning, b.reasoning)
        views.append(PairView(key[0], key[1], a.score, b.score, a.reasoning, b.reasoning, a.n_tokens, b.n_tokens,
                              a.forced, b.forced, divergence))
    return views


def select_pairs(views: Sequence[PairView], limit: int = MAX_LISTED) -> list[PairView]:
    """All of ``views`` when there are at most ``limit``; else the flips, then forced answers, then differing chains,
    each by |Δscore| (largest first), then the rest by |Δscore|, cut to ``limit``."""
    if len(views) <= limit:
        return list(views)
    ranked = sorted(views, key=lambda v: (not v.flipped, not v.forced, v.divergence is None, -v.abs_diff,
                                          v.qid, v.docid))
    return ranked[:limit]
