"""One continuous batch shared by concurrent callers (the HTTP server's requests).

A worker thread owns the llama.cpp context and runs :meth:`Scheduler.serve` over a :class:`RoundRobinQueue`:
every submitted request's pairs wait in their own queue, and each time a slot frees, the next request in turn
gives one pair. Eight requests of two documents fill eight slots together; a request of 100 documents takes
one slot in turn with the others and cannot starve a request of 2. A cancelled request (its client went away)
has its waiting pairs dropped and its running ones stopped at the next step, freeing their slots.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rank1_local.backends.llama.facade import Rank1
from rank1_local.backends.llama.scheduler import Job, Scheduler, SchedulerParams, make_jobs
from rank1_local.core.config import ScoringConfig
from rank1_local.core.duplicates import Duplicates, find_duplicates
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, prepare_pairs
from rank1_local.core.results import Rank1Result

logger = logging.getLogger(__name__)


class ServiceStopped(Rank1Error):
    """The service is shutting down and takes no new work."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: its results go to ``on_result`` as they finish (cache hits at once)."""

    id: int
    size: int  # pairs in the request
    on_result: Callable[[Rank1Result], None]
    on_error: Callable[[BaseException], None]
    duplicates: Duplicates | None = None  # pairs with the same prompt as an earlier pair get copies of its result
    cancelled: bool = False
    finished: int = 0

    @property
    def done(self) -> bool:
        return self.finished >= self.size


class RoundRobinQueue:
    """Pending jobs per ticket; :meth:`next_job` takes one from each ticket in turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, deque[Job]] = OrderedDict()
        self._closed = False

    def add(self, ticket: Ticket, jobs: Sequence[Job]) -> None:
        with self._cond:
            if self._closed:
                raise ServiceStopped("the server is shutting down")
            if jobs:
                self._pending[ticket.id] = deque(jobs)
                self._cond.notify()

    def next_job(self, block: bool) -> Job | None:
        with self._cond:
            while not self._pending:
                if self._closed or not block:
                    return None
                self._cond.wait()
            ticket_id, jobs = next(iter(self._pending.items()))
            job = jobs.popleft()
            if jobs:
                self._pending.move_to_end(ticket_id)
            else:
                del self._pending[ticket_id]
            return job

    def drop(self, ticket: Ticket) -> int:
        """Forget the ticket's waiting jobs; how many there were."""
        with self._cond:
            return len(self._pending.pop(ticket.id, ()))

    def close(self) -> None:
        """Take no new tickets; :meth:`next_job` returns None once the waiting jobs are taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._pending.values())


@dataclass
class ServiceCounters:
    """Totals since start (for /metrics)."""

    requests: int = 0  # requests submitted
    requests_done: int = 0  # requests with every result delivered
    pairs: int = 0  # results delivered, cache hits included
    cache_hits: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancelled_requests: int = 0
    cancelled_pairs: int = 0
    errors: int = 0
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ShutdownReport:
    """What happened to the requests in flight when shutdown began."""

    in_flight: int  # requests with pairs still to score when shutdown began
    finished_requests: int  # of those, finished
    cancelled_requests: int  # of those, cancelled (their waiting and running pairs dropped)
    cancelled_pairs: int


class BatchService:
    """Serve concurrent scoring requests from one :class:`Rank1` model in one continuous batch.

    Args:
        model: the loaded model; the service's worker thread owns its llama.cpp context from :meth:`start` on.
    """

    def __init__(self, model: Rank1) -> None:
        self.model = model
        self.counters = ServiceCounters()
        self._queue = RoundRobinQueue()
        self._tickets: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._scheduler = Scheduler(model.engine, SchedulerParams(model.settings.parallel, model.config,
                                                                  model.true_id, model.false_id))
        self._thread: threading.Thread | None = None
        self._drain_start: tuple[int, int, int] | None = None  # open requests, cancelled totals when draining began

    # --- state -----------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.model.settings.parallel

    @property
    def active_slots(self) -> int:
        return self._scheduler.active

    @property
    def queue_depth(self) -> int:
        return self._queue.depth

    @property
    def open_requests(self) -> int:
        with self._lock:
            return len(self._tickets)

    # --- life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="rank1-batch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            try:
                self._scheduler.serve(self._queue, self._deliver, self._is_cancelled)
                return
            except Exception as exc:  # a failed decode must not leave requests waiting forever
                logger.exception("scoring failed; failing the requests in flight and going on")
                self.counters.errors += 1
                with self._lock:
                    tickets = list(self._tickets.values())
                    self._tickets.clear()
                for ticket in tickets:
                    self._queue.drop(ticket)
                    ticket.on_error(exc)

    def drain(self) -> None:
        """Take no new requests (they get :class:`ServiceStopped`); those in flight go on."""
        if self._drain_start is None:
            with self._lock:
                self._drain_start = (len(self._tickets), self.counters.cancelled_requests,
                                     self.counters.cancelled_pairs)
            self._queue.close()

    def stop(self, timeout: float) -> ShutdownReport:
        """Take no new requests, let those in flight finish for up to ``timeout`` seconds, cancel the rest, and
        end the worker thread."""
        self.drain()
        deadline = time.monotonic() + timeout
        while self.open_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._tickets.values())
        for ticket in left:
            self.cancel(ticket)
        if self._thread is not None:
            self._thread.join(timeout=30.0)
        assert self._drain_start is not None
        in_flight, cancelled0, pairs0 = self._drain_start
        cancelled = self.counters.cancelled_requests - cancelled0
        return ShutdownReport(in_flight=in_flight, finished_requests=in_flight - cancelled,
                              cancelled_requests=cancelled, cancelled_pairs=self.counters.cancelled_pairs - pairs0)

    # --- requests --------------------------------------------------------------------------------------
    def submit(self, pairs: Sequence[Pair | tuple], config: ScoringConfig | None,
               on_result: Callable[[Rank1Result], None], on_error: Callable[[BaseException], None]) -> Ticket:
        """Queue ``pairs`` (scored under ``config``, by default the model's); results reach ``on_result`` as they
        finish, in any order (``result.index`` is the position in ``pairs``). Thread-safe."""
        if self._queue.closed:
            raise ServiceStopped("the server is shutting down")
        config = config or self.model.config
        if config.n_ctx != self.model.config.n_ctx:
            raise Rank1Error(f"n_ctx is fixed when the model is loaded ({self.model.config.n_ctx})")
        prepared = prepare_pairs(pairs, config, self.model.engine.tokenize, self.model.engine.detokenize)
        duplicates = find_duplicates(prepared)
        ticket = Ticket(next(self._ids), len(prepared), on_result, on_error, duplicates)
        self.counters.requests += 1
        scope = (self.model if config == self.model.config else self.model.with_config(config)).cache_scope()
        hits = scope.lookup(duplicates.unique) if scope is not None else {}
        misses = [p for p in duplicates.unique if p.index not in hits]
        if misses:
            jobs = make_jobs(misses, self.model.engine.tokenize, config=config, owner=(ticket, scope))
            with self._lock:
                self._tickets[ticket.id] = ticket
            try:
                self._queue.add(ticket, jobs)
            except ServiceStopped:
                with self._lock:
                    self._tickets.pop(ticket.id, None)
                raise
        self.counters.cache_hits += len(hits)
        for result in hits.values():
            self._count(ticket, result)
        return ticket

    def abort(self, reason: str) -> int:
        """Cancel every request in flight and tell each one why (:class:`ServiceStopped`); how many there were."""
        with self._lock:
            left = list(self._tickets.values())
        for ticket in left:
            if self.cancel(ticket):
                ticket.on_error(ServiceStopped(reason))
        return len(left)

    def cancel(self, ticket: Ticket) -> int:
        """Stop scoring the ticket's pairs (waiting ones are dropped, running ones stop at the next step); how
        many were left."""
        with self._lock:
            if ticket.cancelled or self._tickets.pop(ticket.id, None) is None:
                return 0
            ticket.cancelled = True
            left = ticket.size - ticket.finished
            self.counters.cancelled_requests += 1
            self.counters.cancelled_pairs += left
        self._queue.drop(ticket)
        logger.info("request %d cancelled: %d of its %d pairs not scored", ticket.id, left, ticket.size)
        return left

    def _is_cancelled(self, job: Job) -> bool:
        ticket, _ = job.owner
        return ticket.cancelled

    def _deliver(self, job: Job, result: Rank1Result) -> None:
        ticket, scope = job.owner
        if scope is not None:
            scope.store(job.pair, result)
        self.counters.prompt_tokens = self._scheduler.prompt_tokens
        self.counters.generated_tokens = self._scheduler.generated_tokens
        if ticket.cancelled:
            return
        self._count(ticket, result)

    def _count(self, ticket: Ticket, result: Rank1Result) -> None:
        results = ticket.duplicates.fan_out(result) if ticket.duplicates is not None else [result]
        with self._lock:  # cache hits are counted in the caller's thread, scored pairs in the worker
            ticket.finished += len(results)
            self.counters.pairs += len(results)
            if ticket.done:
                self._tickets.pop(ticket.id, None)
                self.counters.requests_done += 1
        for each in results:
            ticket.on_result(each)
