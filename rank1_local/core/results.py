"""Result objects of the runtime, and the one place a result is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rank1_local.core.pairs import PreparedPair
from rank1_local.core.protocol import NO_SCORE


@dataclass(frozen=True)
class Rank1Result:
    """One scored (query, passage) pair."""

    index: int  # position of the pair in the caller's input
    score: float  # P(" true") / (P(" true") + P(" false")) at the answer
    reasoning: str  # the model's reasoning chain (text before </think>)
    n_tokens: int  # tokens the model generated
    forced: bool  # reasoning did not close within the budget: the fallback forced the answer
    truncated: bool  # the passage was cut to fit the context
    passage_tokens_dropped: int
    n_prompt_tokens: int
    seconds: float  # wall time from the pair's start to its score
    too_long: bool = False  # the prompt did not fit the context: not run, score 0.5
    cached: bool = False  # served from the judgment cache (``seconds`` is then the lookup time)

    @property
    def relevant(self) -> bool:
        return self.score > 0.5


def judgment_fields(result: Rank1Result) -> dict[str, Any]:
    """What a result says beyond its score, by the names every output uses (run files, the CLI's json/jsonl, the
    server's ``return_reasoning``)."""
    return {"reasoning": result.reasoning, "n_tokens": result.n_tokens, "forced": result.forced,
            "truncated": result.truncated, "too_long": result.too_long, "cached": result.cached}


def result_dict(result: Rank1Result, **ids: Any) -> dict[str, Any]:
    """One result as a JSON-ready row: ``ids`` first (``qid``, ``docid``, ``rank`` … in the order given), then
    ``score``, ``relevant`` and :func:`judgment_fields`. The one place results become rows (CLI output, run files;
    the server's rows add :func:`judgment_fields` to their own shape)."""
    return {**ids, "score": result.score, "relevant": result.relevant, **judgment_fields(result)}


def build_result(pair: PreparedPair, *, score: float, reasoning: str, n_tokens: int, forced: bool,
                 seconds: float, cached: bool = False) -> Rank1Result:
    return Rank1Result(index=pair.index, score=float(score), reasoning=reasoning, n_tokens=n_tokens, forced=forced,
                       truncated=pair.truncated, passage_tokens_dropped=pair.passage_tokens_dropped,
                       n_prompt_tokens=len(pair.ids), seconds=seconds, too_long=pair.too_long, cached=cached)


def too_long_result(pair: PreparedPair) -> Rank1Result:
    """The result of a pair whose prompt does not fit the context (the official code scores it 0.5)."""
    return build_result(pair, score=NO_SCORE, reasoning="", n_tokens=0, forced=False, seconds=0.0)


@dataclass(frozen=True)
class RunStats:
    pairs: int
    prompt_tokens: int  # prompt tokens actually evaluated (shared prefixes once)
    generated_tokens: int
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0
