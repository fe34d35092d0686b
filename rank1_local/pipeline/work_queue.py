"""The queue between callers and the thread that owns a backend: each call's pairs wait in their own line, and the
owner takes one pair from each call in turn (a call of 100 documents cannot starve a call of 2).

Taking a pair marks it started on its ticket (its admission is given back, its wait measured); a cancelled call's
pairs are dropped at once (:meth:`WorkQueue.drop`), so they neither wait nor count as waiting.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, Protocol

from rank1_local.core.config import ScoringConfig
from rank1_local.pipeline.tickets import Stopped, Ticket


class QueuedJob(Protocol):
    """What the queue needs of a job: the ticket it belongs to and its protocol settings."""

    owner: Ticket
    config: ScoringConfig


class WorkQueue:
    """Pending jobs per ticket; :meth:`next_job` takes one from each ticket in turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, deque[Any]] = OrderedDict()
        self._closed = False
        self._depth = 0

    def add(self, ticket: Ticket, jobs: Sequence[QueuedJob]) -> None:
        with self._cond:
            if self._closed:
                raise Stopped("the model is closing and takes no new work")
            if jobs and not ticket.ended:
                self._pending.setdefault(ticket.id, deque()).extend(jobs)
                self._depth += len(jobs)
                self._cond.notify()

    def _pop(self) -> Any:
        """The next job in turn (the lock is held and a job is pending)."""
        ticket_id, jobs = next(iter(self._pending.items()))
        job = jobs.popleft()
        self._depth -= 1
        if jobs:
            self._pending.move_to_end(ticket_id)
        else:
            del self._pending[ticket_id]
        return job

    def next_job(self, block: bool) -> Any:
        """The next job, marked started; None when there is none now (``block=False``) or ever again (closed)."""
        with self._cond:
            while not self._pending:
                if self._closed or not block:
                    return None
                self._cond.wait()
            job = self._pop()
        job.owner.started()
        return job

    def next_batch(self, limit: int, block: bool) -> list[Any]:
        """Up to ``limit`` jobs with the first one's settings, taken in turn from the calls waiting (for a backend
        that scores a batch in one go); [] as :meth:`next_job` gives None."""
        first = self.next_job(block)
        if first is None:
            return []
        batch = [first]
        with self._cond:
            skipped: list[Any] = []
            while self._pending and len(batch) < limit:
                job = self._pop()
                (batch if job.config == first.config else skipped).append(job)
            for job in reversed(skipped):  # back at the head of their lines, in order
                self._pending.setdefault(job.owner.id, deque()).appendleft(job)
                self._pending.move_to_end(job.owner.id, last=False)
                self._depth += 1
        for job in batch[1:]:
            job.owner.started()
        return batch

    @property
    def interleaved(self) -> bool:
        """Several calls' jobs alternate (their queries are mixed)."""
        return len(self._pending) > 1

    def drop(self, ticket: Ticket) -> int:
        """Forget the ticket's waiting jobs; how many there were."""
        with self._cond:
            dropped = len(self._pending.pop(ticket.id, ()))
            self._depth -= dropped
            return dropped

    def close(self) -> None:
        """Take no new jobs; :meth:`next_job` returns None once the waiting jobs are taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        """Jobs waiting."""
        return self._depth
