"""A cascade: a fast reranker (the *prefilter*, e.g. Qwen3-Reranker, which answers at once) scores every document of a
query; the reranker (rank1) reasons only over the prefilter's best ``keep``; below that cut the prefilter's order
stands.

It is a composition of two loaded models, written once for every caller: :class:`CascadeEngine` is a
:class:`~rank1_local.core.engine.ScoringEngine` over the two models' engines, so the library API, run files and the
server use a cascade as they use one model, and :class:`Cascade` is the :class:`~rank1_local.core.reranker.Reranker`
over it (``rank1-local rerank --prefilter MODEL --keep N``, ``serve --prefilter``; ``rank1-bench study`` derives its
cascade points from the two models' runs, which this equals).

- A call's pairs are grouped by query (its text and instruction). The prefilter scores every pair, with its own
  settings; once a query's pairs all have their prefilter scores, its best ``keep`` (ties: input order) go to the
  reranker, with the call's settings, and the rest are final at once.
- Each result says which stage scored it (``result.stage``: ``"prefilter"``, or the reranker's card name, ``"rank1"``)
  and is that stage's own result: a kept document gets exactly the score the reranker alone gives it (the reranker's
  call holds the kept pairs in input order; llama.cpp's batches can move a score by ~1e-3 when other pairs share
  them, as anywhere).
- :func:`~rank1_local.core.reranker.ranked` puts the kept documents first (by the reranker's score), then the others
  in the prefilter's order.
- Every result below a cut comes before any kept one (the reranker's call starts once every query has its prefilter
  scores). So a run file resumed after a stop lacks either only kept pairs, or every kept pair of a query with some
  of its others: scoring just the pairs it lacks keeps the same ones (the best of a set that holds the kept pairs are
  the kept pairs), and nothing is scored twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.engine import EngineStats, ScoringEngine, ShutdownReport, TicketView
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, normalize_pairs
from rank1_local.core.reranker import PREFILTER_STAGE, Reranker
from rank1_local.core.results import Rank1Result, RunStats


def prefilter_config(config: ScoringConfig) -> ScoringConfig:
    """The settings a prefilter gets beside a reranker with ``config`` (the command line's and the study's choice):
    the context rank1's prompt has beside its budget (``n_ctx - max_think_tokens``: a prefill reranker needs no more,
    and its KV cache stays small), and a budget of 1 (it answers at once)."""
    return ScoringConfig(max_think_tokens=1, n_ctx=config.n_ctx - config.max_think_tokens, protocol=config.protocol,
                         truncate_passages=config.truncate_passages)


def check_keep(keep: Any) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise Rank1Error(f"keep must be at least 1 (the documents per query the reranker reasons over), got {keep!r}")
    return keep


class CascadeTicket:
    """One call through a cascade: the prefilter's ticket, then (once every query's prefilter scores are in) the
    reranker's ticket for the kept pairs. Driven by whoever takes its results, in a thread (:meth:`results`) or an
    event loop (:meth:`aresults`)."""

    def __init__(self, id: int, engine: CascadeEngine, pairs: list[Pair], config: ScoringConfig | None,
                 first: TicketView) -> None:
        self.id, self.size = id, len(pairs)
        self._engine, self._pairs, self._config, self._first = engine, pairs, config, first
        self._second: TicketView | None = None
        self._kept: list[int] = []  # the call's indexes of the pairs sent to the reranker, in input order
        self._lock = threading.Lock()
        self._cancelled = False
        self.delivered = 0
        groups: dict[tuple[str, str | None], list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault((pair.query, pair.instruction), []).append(i)
        self._members = list(groups.values())
        self._group = {i: g for g, members in enumerate(self._members) for i in members}
        self._left = [len(m) for m in self._members]
        self._prefilter: dict[int, Rank1Result] = {}

    def _prefiltered(self, result: Rank1Result) -> list[Rank1Result]:
        """A prefilter result in; once its query's are all in, the query's pairs below the cut (final now)."""
        self._prefilter[result.index] = result
        g = self._group[result.index]
        self._left[g] -= 1
        if self._left[g]:
            return []
        order = sorted(self._members[g], key=lambda i: (-self._prefilter[i].score, i))
        keep = self._engine.keep
        self._kept += order[:keep]
        return [dataclasses.replace(self._prefilter[i], stage=PREFILTER_STAGE) for i in order[keep:]]

    def _start_second(self) -> TicketView | None:
        """The reranker's call over the kept pairs (in input order), unless the cascade was cancelled."""
        with self._lock:
            if self._cancelled or not self._kept:
                return None
            self._kept.sort()
            self._second = self._engine.reranker.submit([self._pairs[i] for i in self._kept], self._config)
            return self._second

    def _reranked(self, result: Rank1Result) -> Rank1Result:
        return dataclasses.replace(result, index=self._kept[result.index], stage=self._engine.stage)

    def results(self) -> Iterator[Rank1Result]:
        try:
            for result in self._first.results():
                for out in self._prefiltered(result):
                    self.delivered += 1
                    yield out
            second = self._start_second()
            if second is not None:
                for result in second.results():
                    self.delivered += 1
                    yield self._reranked(result)
        finally:
            if self.delivered < self.size:
                self.cancel()

    async def aresults(self, wait: float | None = None) -> AsyncIterator[Rank1Result | None]:
        try:
            async for result in self._first.aresults(wait):
                if result is None:
                    yield None
                    continue
                for out in self._prefiltered(result):
                    self.delivered += 1
                    yield out
            second = await asyncio.to_thread(self._start_second)  # tokenizing: off the event loop
            if second is not None:
                async for result in second.aresults(wait):
                    if result is None:
                        yield None
                        continue
                    self.delivered += 1
                    yield self._reranked(result)
        finally:
            if self.delivered < self.size:
                self.cancel()

    def cancel(self) -> int:
        with self._lock:
            if self._cancelled:
                return 0
            self._cancelled = True
            second = self._second
        self._first.cancel()
        if second is not None:
            second.cancel()
        return self.size - self.delivered

    def stats(self) -> RunStats:
        """Both stages' pairs and tokens, and the time since the call was submitted."""
        first = self._first.stats()
        second = self._second.stats() if self._second is not None else RunStats(0, 0, 0, 0.0)
        return RunStats(first.pairs + second.pairs, first.prompt_tokens + second.prompt_tokens,
                        first.generated_tokens + second.generated_tokens, first.seconds)


class CascadeEngine:
    """A :class:`~rank1_local.core.engine.ScoringEngine` over a prefilter's engine and a reranker's engine.

    Args:
        prefilter: the engine that scores every pair (with its own default settings).
        reranker: the engine that scores the kept pairs (with the call's settings).
        keep: pairs per query the reranker scores.
        stage: the name the reranker's results carry (its card's: ``"rank1"``).
        check_config: the reranker's check of a call's settings (so a bad one is refused before the prefilter runs).
    """

    def __init__(self, prefilter: ScoringEngine, reranker: ScoringEngine, keep: int, *, stage: str,
                 check_config: Callable[[ScoringConfig | None], ScoringConfig] | None = None) -> None:
        self.prefilter, self.reranker, self.keep, self.stage = prefilter, reranker, check_keep(keep), stage
        self._check_config = check_config
        self._ids = itertools.count(1)

    def submit(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig | None = None) -> CascadeTicket:
        pairs = normalize_pairs(pairs)
        if self._check_config is not None:
            self._check_config(config)
        return CascadeTicket(next(self._ids), self, pairs, config, self.prefilter.submit(pairs, None))

    def stats(self) -> EngineStats:
        """The reranker's engine (where the cascade's time goes), with both stages' tokens."""
        main, first = self.reranker.stats(), self.prefilter.stats()
        return dataclasses.replace(main, prompt_tokens=main.prompt_tokens + first.prompt_tokens,
                                   waiting=main.waiting + first.waiting,
                                   open_requests=max(main.open_requests, first.open_requests))

    def drain(self) -> None:
        self.prefilter.drain()
        self.reranker.drain()

    def stop(self, timeout: float, reason: str) -> ShutdownReport:
        """Both stages stop taking calls; the reranker's calls get ``timeout`` seconds, then what is left of both is
        cancelled (a call still in its prefilter stage is cancelled with ``reason``). The counts are both stages'."""
        self.drain()
        main = self.reranker.stop(timeout, reason)
        first = self.prefilter.stop(0.0, reason)
        return ShutdownReport(*(a + b for a, b in zip(dataclasses.astuple(main), dataclasses.astuple(first))))


class Cascade(Reranker):
    """A prefilter and a reranker as one model: ``Cascade(open_reranker(...qwen3-reranker...), open_reranker(...rank1
    ...), keep=20)``. Every method of :class:`~rank1_local.core.reranker.Reranker` works on it; ``rerank`` and ``rank``
    give the cascade's order (the kept documents by rank1's score, then the others in the prefilter's order), and
    ``predict`` each pair's score from the stage that scored it. Closing it closes both models.

    Args:
        prefilter: the fast reranker that scores every document (any loaded reranker).
        reranker: the reranker that reasons over the kept ones (rank1).
        keep: documents per query the reranker scores.
        prefilter_name: how run headers name the prefilter (default: its file name).
    """

    def __init__(self, prefilter: Reranker, reranker: Reranker, keep: int, *,
                 prefilter_name: str | None = None) -> None:
        self.keep = check_keep(keep)
        self.prefilter, self.reranker = prefilter, reranker
        self.prefilter_name = prefilter_name or prefilter.model_path.name
        self.config, self.card, self.backend, self.model_path = (reranker.config, reranker.card, reranker.backend,
                                                                 reranker.model_path)
        self.engine = CascadeEngine(prefilter.engine, reranker.engine, self.keep, stage=reranker.card.name,
                                    check_config=getattr(reranker.engine, "config_for", None))

    @property
    def device(self) -> str:
        return f"{self.reranker.device}; prefilter {self.prefilter.model_path.name} ({self.prefilter.card.name}) on " \
               f"{self.prefilter.backend} {self.prefilter.device}"

    def score_settings(self, config: ScoringConfig | None = None) -> dict[str, Any]:
        """The reranker's, with the prefilter and the cut (a run file resumed with another is refused)."""
        return {**self.reranker.score_settings(config), "prefilter": self.prefilter_name, "keep": self.keep}

    def _close_backend(self) -> None:
        try:
            self.reranker.close()
        finally:
            self.prefilter.close()
