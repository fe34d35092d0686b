"""The one thread that owns a llama.cpp context (an :class:`~rank1_local.pipeline.owner.OwnerThread`).

It creates the engine, runs :meth:`Scheduler.serve` over the pipeline's work queue, and frees the engine when its loop
ends: the context is only ever touched by this thread. Everyone else submits work — library calls from any number
of threads, server requests, Ray actors — and all of it shares one continuous batch: each call's pairs wait in
their own line, and each time a slot frees, the next call in turn gives one pair (eight calls of two documents fill
eight slots together; a call of 100 documents takes one slot in turn with the others and cannot starve a call of 2).
"""

from __future__ import annotations

from collections.abc import Callable

from rank1_local.backends.llama.engine import DeviceInfo, LlamaEngine
from rank1_local.backends.llama.scheduler import Job, Scheduler, SchedulerParams, make_jobs
from rank1_local.core.cards import RANK1, ModelCard
from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import PreparedPair
from rank1_local.pipeline.owner import OwnerThread
from rank1_local.pipeline.tickets import Ticket


class EngineOwner(OwnerThread[LlamaEngine]):
    """Owns one llama.cpp context in a thread of its own: the pipeline's executor for the llama.cpp backend.

    Args:
        open_engine: makes the engine (called in the owner thread; a failure is raised in the constructor).
        params: the scheduler's slots and answer tokens.
        tokenize: the callers' tokenizer (jobs are made in the caller's thread).
    """

    def __init__(self, open_engine: Callable[[], LlamaEngine], params: SchedulerParams,
                 tokenize: Callable[[str], list[int]], *, card: ModelCard = RANK1, name: str = "rank1-llama") -> None:
        self.params = params
        self.card = card
        self.slots = params.parallel
        self._tokenize = tokenize
        self._scheduler: Scheduler | None = None
        self._totals = [0, 0]  # prompt and generated tokens of the scheduler's earlier runs
        self.device: DeviceInfo | None = None
        super().__init__(open_engine, name=name)

    def _prepare(self, engine: LlamaEngine) -> None:
        self._scheduler = Scheduler(engine, self.params)
        self.device = engine.device
        self.timings = getattr(engine, "timings", None)  # where the decode steps' time goes (benchmarks)
        self.sampling = getattr(engine, "sampling", "host")

    def _make_jobs(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> list[Job]:
        return make_jobs(pairs, self._tokenize, config, owner=ticket, tally=ticket.tally, card=self.card)

    def _serve(self, engine: LlamaEngine) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        try:
            scheduler.serve(self.queue, self.deliver, self.is_cancelled)
        finally:
            self._totals[0] += scheduler.prompt_tokens
            self._totals[1] += scheduler.generated_tokens
            scheduler.prompt_tokens = scheduler.generated_tokens = 0

    @property
    def active_slots(self) -> int:
        return self._scheduler.active if self._scheduler is not None else 0

    @property
    def tokens(self) -> tuple[int, int]:
        """(prompt, generated) tokens decoded since start."""
        s = self._scheduler
        return self._totals[0] + (s.prompt_tokens if s else 0), self._totals[1] + (s.generated_tokens if s else 0)
