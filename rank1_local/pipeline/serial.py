"""The executor of a backend that scores a batch of pairs at a time (transformers: one pair; vLLM: every pair waiting,
in one ``generate`` call): one owner thread takes the next batch from the work queue, calls the backend's scorer, and
delivers each judgment as the scorer reports it. Calls from any number of threads share it; the model is only touched
by the owner thread, which also loads it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result
from rank1_local.pipeline.owner import OwnerThread
from rank1_local.pipeline.tickets import Ticket


@dataclass(frozen=True, eq=False)
class SerialJob:
    pair: PreparedPair
    config: ScoringConfig
    owner: Ticket


class BatchScorer(Protocol):
    """A backend's model as the owner thread drives it."""

    batch_size: int  # pairs taken from the queue at once
    tokenizer: Any  # shared with callers' threads (thread-safe), or None

    def score(self, pairs: Sequence[PreparedPair], config: ScoringConfig,
              deliver: Callable[[int, Rank1Result], None], cancelled: Callable[[int], bool]) -> None:
        """Score ``pairs`` under ``config``, reporting each with ``deliver(position, result)``; a pair for which
        ``cancelled(position)`` is true may be skipped."""
        ...

    def close(self) -> None: ...


class SerialOwner(OwnerThread[BatchScorer]):
    """The owner thread of a :class:`BatchScorer` (made by ``open_scorer``, in that thread)."""

    def __init__(self, open_scorer: Callable[[], BatchScorer], *, name: str) -> None:
        self.slots = 1
        self.active_slots = 0
        self.prompt_tokens = self.generated_tokens = 0
        self._count_lock = threading.Lock()
        super().__init__(open_scorer, name=name)

    def _prepare(self, scorer: BatchScorer) -> Any:
        self.slots = scorer.batch_size
        return scorer.tokenizer

    def _make_jobs(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> list[SerialJob]:
        return [SerialJob(pair, config, ticket) for pair in pairs]

    def _serve(self, scorer: BatchScorer) -> None:
        while True:
            batch: list[SerialJob] = self.queue.next_batch(scorer.batch_size, block=True)
            if not batch:
                return
            self.active_slots = len(batch)
            try:
                scorer.score([job.pair for job in batch], batch[0].config,
                             lambda i, result: self._deliver_counted(batch[i], result),
                             lambda i: batch[i].owner.cancelled)
            except BaseException as exc:  # this batch's calls fail (whatever was raised); the others go on
                for ticket in {id(job.owner): job.owner for job in batch}.values():
                    self.cancel(ticket)
                    ticket.fail(exc)
            finally:
                self.active_slots = 0

    def _deliver_counted(self, job: SerialJob, result: Rank1Result) -> None:
        tally = job.owner.tally
        with self._count_lock:
            tally.prompt_tokens += result.n_prompt_tokens
            tally.generated_tokens += result.n_tokens
            self.prompt_tokens += result.n_prompt_tokens
            self.generated_tokens += result.n_tokens
        self.deliver(job, result)

    @property
    def tokens(self) -> tuple[int, int]:
        return self.prompt_tokens, self.generated_tokens
