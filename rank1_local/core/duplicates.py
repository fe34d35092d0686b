"""Pairs whose prompts are the same text are judged once.

Decoding is greedy, so two pairs with the same full prompt (query, passage, instruction, prompt template after
truncation) have the same judgment: RAG retrievers often return one chunk twice, and a request of N copies should
cost one generation, not N. The first pair of each prompt is scored; the others get a copy of its result with
their own ``index``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Duplicates:
    """``unique``: the pairs to score, in input order; ``copies``: index of a scored pair -> the indexes of the
    later pairs with the same prompt."""

    unique: list[PreparedPair]
    copies: dict[int, tuple[int, ...]]

    @property
    def count(self) -> int:
        """How many pairs are not scored because an earlier pair has the same prompt."""
        return sum(len(c) for c in self.copies.values())

    def fan_out(self, result: Rank1Result) -> list[Rank1Result]:
        """``result`` and one copy of it for each later pair with the same prompt."""
        return [result, *(dataclasses.replace(result, index=i) for i in self.copies.get(result.index, ()))]


def find_duplicates(prepared: Sequence[PreparedPair]) -> Duplicates:
    """Group pairs by prompt text (too-long pairs are never run, so they are left as they are)."""
    first: dict[str, int] = {}
    unique: list[PreparedPair] = []
    copies: dict[int, list[int]] = {}
    for pair in prepared:
        if not pair.too_long:
            owner = first.setdefault(pair.prompt, pair.index)
            if owner != pair.index:
                copies.setdefault(owner, []).append(pair.index)
                continue
        unique.append(pair)
    return Duplicates(unique, {k: tuple(v) for k, v in copies.items()})
