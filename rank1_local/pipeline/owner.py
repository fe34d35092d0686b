"""The one thread that owns a backend's model: it opens it, serves the work queue, and frees it when its loop ends.

A backend's model (a llama.cpp context, a torch model, a vLLM engine) is only ever touched by this thread; callers
submit work through the pipeline, and the thread delivers each judgment to its ticket. Loading happens in the thread
too: a failure at any point before the thread is ready is raised in the constructor (never a hang), and whatever was
opened is freed by the thread on its way out. Closing stops taking work, cancels what is in flight (its callers get
:class:`~rank1_local.pipeline.tickets.Stopped` at once), waits for the loop to end after its current step, and only
then does the thread free the model.

:class:`OwnerThread` is the common part; each backend says how to make its jobs, how to serve the queue, and what
its stats are (:class:`rank1_local.backends.llama.owner.EngineOwner` for llama.cpp's continuous batch,
:class:`rank1_local.pipeline.serial.SerialOwner` for a backend that scores one batch at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result
from rank1_local.pipeline.tickets import Stopped, Ticket
from rank1_local.pipeline.work_queue import WorkQueue

logger = logging.getLogger(__name__)

STOP_WAIT_S = 600.0  # how long close() waits for a step in progress to end before it gives up (and never frees)

R = TypeVar("R")  # what the thread owns


class OwnerThread(Generic[R]):
    """Owns one resource in a thread of its own: the pipeline's executor for one backend.

    Args:
        open_resource: makes the resource (called in the owner thread).
        name: the thread's name.
    """

    def __init__(self, open_resource: Callable[[], R], *, name: str) -> None:
        self.queue = WorkQueue()
        self._tickets: dict[int, Ticket] = {}  # tickets with work here, for failing them if scoring breaks
        self._lock = threading.Lock()
        self._ready: Future[Any] = Future()
        self._thread = threading.Thread(target=self._main, args=(open_resource,), name=name, daemon=True)
        self._thread.start()
        self.info = self._ready.result()  # what _prepare returned; a load error is raised here

    # --- what each backend provides ----------------------------------------------------------------------------
    def _prepare(self, resource: R) -> Any:
        """In the owner thread, once the resource is open (before callers may submit); what it returns (something
        callers may share, such as a thread-safe tokenizer) is :attr:`info`."""
        return None

    def _make_jobs(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> list[Any]:
        raise NotImplementedError

    def _serve(self, resource: R) -> None:
        """Score jobs from :attr:`queue` until it is closed and empty; a step that fails raises (its calls fail, and
        serving goes on)."""
        raise NotImplementedError

    def _free(self, resource: R) -> None:
        """Free the resource (in the owner thread, after its loop has ended)."""
        close = getattr(resource, "close", None)
        if close is not None:
            close()

    # --- the owner thread --------------------------------------------------------------------------------------
    def _main(self, open_resource: Callable[[], R]) -> None:
        try:
            resource = open_resource()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        try:
            try:
                info = self._prepare(resource)
            except BaseException as exc:
                self._ready.set_exception(exc)
                return
            self._ready.set_result(info)
            while True:
                try:
                    self._serve(resource)
                    return  # the queue was closed and is empty
                except BaseException as exc:  # a failed step must not leave callers waiting forever
                    logger.error("scoring failed (%s: %s); failing the calls in flight and going on",
                                 type(exc).__name__, exc, exc_info=isinstance(exc, Exception))
                    self._fail_all(exc)
        finally:
            self._free(resource)  # the one path that frees it: here, after the loop has ended

    def deliver(self, job: Any, result: Rank1Result) -> None:
        """A job's judgment, to its ticket (never raises)."""
        ticket: Ticket = job.owner
        ticket.deliver(job.pair, result)
        if ticket.ended:
            self._forget(ticket)

    @staticmethod
    def is_cancelled(job: Any) -> bool:
        return job.owner.cancelled

    def _forget(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.pop(ticket.id, None)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            self.queue.drop(ticket)
            ticket.fail(exc)

    # --- the executor interface --------------------------------------------------------------------------------
    def run(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> None:
        """Queue ``pairs`` (non-blocking); the owner thread delivers their results to ``ticket``."""
        jobs = self._make_jobs(ticket, pairs, config)
        with self._lock:
            self._tickets[ticket.id] = ticket
        try:
            self.queue.add(ticket, jobs)
        except Stopped:
            self._forget(ticket)
            raise
        if ticket.ended:  # cancelled while it was being queued
            self.cancel(ticket)

    def cancel(self, ticket: Ticket) -> None:
        """Drop the ticket's waiting jobs and forget it (its running ones stop at the next step)."""
        self.queue.drop(ticket)
        self._forget(ticket)

    @property
    def open_tickets(self) -> int:
        with self._lock:
            return len(self._tickets)

    def close(self) -> None:
        """Stop taking work, cancel what is in flight (its callers get :class:`Stopped`), wait for the owner's loop
        to end, which then frees the resource. Safe from any thread, and more than once."""
        self.queue.close()
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            self.queue.drop(ticket)
            ticket.abort(Stopped("the model was closed while this call was running"))
        if threading.current_thread() is self._thread:
            return  # called from the owner thread: the loop ends after this step and frees the resource itself
        deadline = time.monotonic() + STOP_WAIT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                logger.warning("waiting for the step in progress to end before freeing the model")
        if self._thread.is_alive():
            raise Rank1Error("the model's owner thread did not stop; its memory is left allocated")
