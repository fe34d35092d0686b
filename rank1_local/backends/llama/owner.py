"""The one thread that owns a llama.cpp context.

It creates the engine, runs :meth:`Scheduler.serve` over a :class:`WorkQueue`, and frees the engine when its loop
ends: the context is only ever touched by this thread. Everyone else submits work — library calls from any number
of threads, server requests, Ray actors — and all of it shares one continuous batch: each call's pairs wait in
their own queue, and each time a slot frees, the next call in turn gives one pair (eight calls of two documents fill
eight slots together; a call of 100 documents takes one slot in turn with the others and cannot starve a call of 2).

Closing stops taking work, cancels what is in flight (its callers get an error at once), waits for the loop to end
after its current step, and only then lets the owner free llama.cpp's memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from rank1_local.backends.llama.engine import DeviceInfo, LlamaEngine
from rank1_local.backends.llama.scheduler import Job, Scheduler, SchedulerParams, make_jobs
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result
from rank1_local.pipeline import Stopped, Ticket

logger = logging.getLogger(__name__)

STOP_WAIT_S = 600.0  # how long close() waits for a decode step to end before it gives up (and never frees)


class WorkQueue:
    """Pending jobs per ticket; :meth:`next_job` takes one from each ticket in turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, deque[Job]] = OrderedDict()
        self._closed = False
        self._depth = 0

    def add(self, ticket: Ticket, jobs: Sequence[Job]) -> None:
        with self._cond:
            if self._closed:
                raise Stopped("the model is closing and takes no new work")
            if jobs:
                self._pending.setdefault(ticket.id, deque()).extend(jobs)
                self._depth += len(jobs)
                self._cond.notify()

    def next_job(self, block: bool) -> Job | None:
        with self._cond:
            while not self._pending:
                if self._closed or not block:
                    return None
                self._cond.wait()
            ticket_id, jobs = next(iter(self._pending.items()))
            job = jobs.popleft()
            self._depth -= 1
            if jobs:
                self._pending.move_to_end(ticket_id)
            else:
                del self._pending[ticket_id]
            return job

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
        return self._depth


class EngineOwner:
    """Owns one llama.cpp context in a thread of its own: the pipeline's executor for the llama.cpp backend.

    Args:
        open_engine: makes the engine (called in the owner thread; a failure is raised in the constructor).
        params: the scheduler's slots and answer tokens.
        tokenize: the callers' tokenizer (jobs are made in the caller's thread).
    """

    def __init__(self, open_engine: Callable[[], LlamaEngine], params: SchedulerParams,
                 tokenize: Callable[[str], list[int]], *, name: str = "rank1-llama") -> None:
        self.params = params
        self._tokenize = tokenize
        self.queue = WorkQueue()
        self._tickets: dict[int, Ticket] = {}  # tickets with work here, for failing them if decoding breaks
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None
        self._totals = [0, 0]  # prompt and generated tokens of the scheduler's earlier runs
        self._ready: Future[DeviceInfo] = Future()
        self._thread = threading.Thread(target=self._run, args=(open_engine,), name=name, daemon=True)
        self._thread.start()
        self.device = self._ready.result()  # the engine's load error is raised here

    # --- the executor interface ------------------------------------------------------------------------------
    def run(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> None:
        """Queue ``pairs`` (non-blocking); the owner thread delivers their results to ``ticket``."""
        jobs = make_jobs(pairs, self._tokenize, config, owner=ticket, tally=ticket.tally)
        with self._lock:
            self._tickets[ticket.id] = ticket
        try:
            self.queue.add(ticket, jobs)
        except Stopped:
            with self._lock:
                self._tickets.pop(ticket.id, None)
            raise

    @property
    def waiting(self) -> int:
        return self.queue.depth

    @property
    def active_slots(self) -> int:
        return self._scheduler.active if self._scheduler is not None else 0

    @property
    def tokens(self) -> tuple[int, int]:
        """(prompt, generated) tokens decoded since start."""
        return self._totals[0] + (self._scheduler.prompt_tokens if self._scheduler else 0), \
            self._totals[1] + (self._scheduler.generated_tokens if self._scheduler else 0)

    # --- the owner thread ------------------------------------------------------------------------------------
    def _run(self, open_engine: Callable[[], LlamaEngine]) -> None:
        try:
            engine = open_engine()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        try:
            self._scheduler = Scheduler(engine, self.params)
            self._ready.set_result(engine.device)
            while True:
                try:
                    self._scheduler.serve(self.queue, self._deliver, self._is_cancelled)
                    return  # the queue was closed and is empty
                except Exception as exc:  # a failed decode must not leave callers waiting forever
                    logger.exception("scoring failed; failing the calls in flight and going on")
                    self._fail_all(exc)
                finally:
                    self._totals[0] += self._scheduler.prompt_tokens
                    self._totals[1] += self._scheduler.generated_tokens
                    self._scheduler.prompt_tokens = self._scheduler.generated_tokens = 0
        finally:
            engine.close()  # the one path that frees the context: here, after the loop has ended

    def _deliver(self, job: Job, result: Rank1Result) -> None:
        ticket: Ticket = job.owner
        ticket.deliver(job.pair, result)  # never raises: a failing callback fails its own ticket
        if ticket.done:
            with self._lock:
                self._tickets.pop(ticket.id, None)

    @staticmethod
    def _is_cancelled(job: Job) -> bool:
        return job.owner.cancelled

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            self.queue.drop(ticket)
            ticket.fail(exc)

    # --- closing ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking work, cancel what is in flight (its callers get :class:`Stopped`), wait for the owner's loop
        to end, which then frees the context. Safe from any thread, and more than once."""
        self.queue.close()
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            self.queue.drop(ticket)
            ticket.abort(Stopped("the model was closed while this call was running"))
        if threading.current_thread() is self._thread:
            return  # called from a result callback: the loop ends after this step and frees the context itself
        deadline = time.monotonic() + STOP_WAIT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                logger.warning("waiting for the llama.cpp decode step in progress to end before freeing the model")
        if self._thread.is_alive():
            raise Rank1Error("the llama.cpp owner thread did not stop; its memory is left allocated")
