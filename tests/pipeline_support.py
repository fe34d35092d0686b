"""A pipeline over a plain scoring function, for tests of the pipeline's own stages (duplicates, the cache, admission)
without a model: the function runs in a real :class:`~rank1_local.pipeline.serial.SerialOwner` thread."""

from __future__ import annotations

from collections.abc import Callable

from rank1_local.core.config import ScoringConfig
from rank1_local.core.results import Rank1Result, RunStats
from rank1_local.pipeline import Pipeline
from rank1_local.pipeline.serial import SerialOwner


class FunctionScorer:
    """``score(todo, config, deliver(pair, result), cancelled())`` as a backend's batch scorer."""

    batch_size = 10_000
    tokenizer = None

    def __init__(self, score: Callable) -> None:
        self._score = score
        self.closed = False

    def score(self, pairs, config, deliver, cancelled) -> None:
        position = {id(p): i for i, p in enumerate(pairs)}
        self._score(list(pairs), config, lambda p, r: deliver(position[id(p)], r), lambda: cancelled(0))

    def close(self) -> None:
        self.closed = True


def serial_pipeline(tokenizer, score: Callable, config: ScoringConfig, **kw) -> Pipeline:
    owner = SerialOwner(lambda: FunctionScorer(score), name="rank1-test")
    return Pipeline(tokenizer, owner, config, backend="test", device="test", **kw)


def run(pipeline: Pipeline, pairs, config: ScoringConfig | None = None,
        on_result: Callable[[Rank1Result], None] | None = None) -> tuple[list[Rank1Result], RunStats]:
    """Submit ``pairs`` and take every result, as ``Reranker.score_pairs`` does: (results in input order, the call's
    stats)."""
    ticket = pipeline.submit(pairs, config)
    results = {}
    for result in ticket.results():
        results[result.index] = result
        if on_result is not None:
            on_result(result)
    return [results[i] for i in range(ticket.size)], ticket.stats()
