"""A call's ticket: its pairs on their way through the pipeline, and the one way its results come back.

The backend's executor reports each judgment with :meth:`Ticket.deliver` (from its own thread), the call's failure
with :meth:`Ticket.fail`, and each pair it starts with :meth:`Ticket.started`. Results wait in the ticket's buffer
until the caller takes them: :meth:`Ticket.results` in the caller's thread (the library API, run files, Ray workers),
:meth:`Ticket.aresults` in an event loop (the server). A ticket ends exactly once — done, cancelled or failed — and
then tells its pipeline (:attr:`Ticket.on_end`), which forgets it, drops its waiting pairs from the executor and
gives back its admission.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from rank1_local.cache.scope import CacheScope
from rank1_local.core.duplicates import Duplicates
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result, RunStats
from rank1_local.pipeline.admission import Permit

if TYPE_CHECKING:
    from rank1_local.pipeline.counters import Counters

logger = logging.getLogger(__name__)


class Stopped(Rank1Error):
    """The model is closing (or the server shutting down) and takes no new work, or stopped this call."""


class Cancelled(Rank1Error):
    """The call was cancelled while its results were awaited."""


@dataclass
class Tally:
    """Tokens a call's pairs cost where they were decoded (each prompt token counted once)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0


class TicketState(Enum):
    OPEN = "open"
    DONE = "done"  # every result delivered
    CANCELLED = "cancelled"  # its caller stopped it, or it was stopped on shutdown
    FAILED = "failed"  # the backend could not score it


class Ticket:
    """One call's pairs; see the module's docstring. ``size`` counts every input pair (copies and cache hits
    included); ``decoded`` the pairs the backend judged for it."""

    def __init__(self, id: int, prepared: list[PreparedPair], duplicates: Duplicates, scope: CacheScope | None,
                 counters: Counters, permit: Permit, on_end: Callable[[Ticket], None]) -> None:
        self.id = id
        self.size = len(prepared)
        self.duplicates = duplicates
        self.scope = scope
        self.tally = Tally()
        self.decoded = 0
        self.finished = 0
        self.submitted = time.perf_counter()
        self.state = TicketState.OPEN
        self.error: BaseException | None = None
        self._counters, self._permit, self.on_end = counters, permit, on_end
        self._lock = threading.Condition()
        self._buffer: deque[Rank1Result | BaseException] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        if self.size == 0:  # nothing to wait for
            self.state = TicketState.DONE

    # --- state ---------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state is TicketState.DONE

    @property
    def cancelled(self) -> bool:
        """Ended without all its results: its pairs are not to be scored any more."""
        return self.state in (TicketState.CANCELLED, TicketState.FAILED)

    @property
    def ended(self) -> bool:
        return self.state is not TicketState.OPEN

    def _end(self, state: TicketState, item: BaseException | None = None) -> bool:
        """Move to a final state once (False if it had ended already); wake every waiter; tell the pipeline. A call
        that ends without its results (cancelled, failed) drops those not taken yet: its caller gets ``item``
        next."""
        with self._lock:
            if self.state is not TicketState.OPEN:
                return False
            self.state = state
            if item is not None:
                self.error = item
                self._buffer.clear()
                self._buffer.append(item)
            self._lock.notify_all()
        self._wake()
        self._permit.release_all()
        try:
            self.on_end(self)
        except Exception:  # pragma: no cover - the pipeline's bookkeeping must not fail the executor
            logger.exception("request %d: ending it failed", self.id)
        return True

    # --- the executor's side -------------------------------------------------------------------------------------
    def started(self, n: int = 1) -> None:
        """``n`` of its pairs left the queue and began (admission is given back; their wait is measured)."""
        self._permit.release(n)
        self._counters.queue_seconds.observe(time.perf_counter() - self.submitted, n)

    def deliver(self, pair: PreparedPair, result: Rank1Result, *, hit: bool = False) -> None:
        """A judgment: stored in the cache (a new one), then handed to the caller for the pair and its duplicates."""
        if self.scope is not None and not hit:
            self.scope.store(pair, result)
        results = self.duplicates.fan_out(result)
        with self._lock:
            if self.state is not TicketState.OPEN:
                return
            if not hit:
                self.decoded += 1
            self.finished += len(results)
            complete = self.finished >= self.size
            # counted before the caller can see the results: whoever has them sees them counted
            if not hit and not result.too_long:
                self._counters.decode_seconds.observe(result.seconds)
            self._counters.add(pairs=len(results), cache_hits=len(results) if hit else 0,
                               requests_done=int(complete))
            self._buffer.extend(results)
            self._lock.notify_all()
        self._wake()
        if complete:
            self._end(TicketState.DONE)

    def fail(self, exc: BaseException) -> None:
        """The backend could not score this call's pairs."""
        if self._end(TicketState.FAILED, exc):
            self._counters.add(errors=1)

    # --- the caller's side ---------------------------------------------------------------------------------------
    def cancel(self) -> int:
        """Stop the call: waiting pairs are dropped at once, running ones stop at the backend's next step; how many
        results it will not get."""
        left = self.size - self.finished
        if not self._end(TicketState.CANCELLED, Cancelled(f"request {self.id} was cancelled")):
            return 0
        self._counters.add(cancelled_requests=1, cancelled_pairs=left)
        logger.debug("request %d cancelled: %d of its %d pairs not scored", self.id, left, self.size)
        return left

    def abort(self, exc: BaseException) -> bool:
        """Cancel the call and tell its caller why (``exc`` is raised where the results are awaited); False when it
        had ended already."""
        left = self.size - self.finished
        if not self._end(TicketState.CANCELLED, exc):
            return False
        self._counters.add(cancelled_requests=1, cancelled_pairs=left)
        return True

    def _take(self) -> Rank1Result | BaseException | None:
        with self._lock:
            return self._buffer.popleft() if self._buffer else None

    def results(self) -> Iterator[Rank1Result]:
        """Each result as it finishes; the call's failure (or cancellation) is raised. Leaving the loop early
        cancels the rest."""
        received = 0
        try:
            while received < self.size:
                with self._lock:
                    while not self._buffer:
                        self._lock.wait()
                    item = self._buffer.popleft()
                if isinstance(item, BaseException):
                    raise item
                received += 1
                yield item
        finally:
            if received < self.size:
                self.cancel()

    async def aresults(self, wait: float | None = None) -> AsyncIterator[Rank1Result | None]:
        """:meth:`results` in an event loop: ``None`` after each ``wait`` seconds without a result."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        with self._lock:
            self._waiters.append(waiter)
        received = 0
        try:
            while received < self.size:
                item = self._take()
                if item is None:
                    event.clear()
                    if (item := self._take()) is None:  # delivered between the two looks: no wait
                        try:
                            await asyncio.wait_for(event.wait(), wait)
                        except asyncio.TimeoutError:
                            yield None
                        continue
                if isinstance(item, BaseException):
                    raise item
                received += 1
                yield item
        finally:
            with self._lock:
                self._waiters.remove(waiter)
            if received < self.size:
                self.cancel()

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # its loop is closed: that caller has gone
                pass

    def stats(self) -> RunStats:
        return RunStats(self.decoded, self.tally.prompt_tokens, self.tally.generated_tokens,
                        time.perf_counter() - self.submitted)
