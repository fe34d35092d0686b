"""The one path from input pairs to results, shared by every backend and caller (library calls, the server, Ray).

Named stages, in order:

1. **prepare** — validate, format and tokenize every pair (:func:`rank1_local.core.pairs.prepare_pairs`), all of them
   before anything is scored, in the caller's thread;
2. **judge once** — pairs whose prompts are the same text share one judgment (:mod:`rank1_local.core.duplicates`);
3. **look up** — pairs already judged by this model file under these settings come from the judgment cache;
4. **schedule** — the rest go to the backend's :class:`Executor` (for llama.cpp, the thread that owns the context,
   where every caller's pairs share one continuous batch);
5. **store** — each new judgment goes to the cache's writer thread (never written on the decode thread);
6. **fan out** — each result, and a copy for every duplicate, reaches the caller.

A call is a :class:`Ticket`. :meth:`Pipeline.score` waits for its results (in input order) and hands each to
``on_result`` in the caller's own thread as it arrives; :meth:`Pipeline.submit` delivers them to callbacks instead
(the server's streams). A callback that raises fails its own ticket only. Protocol settings come with each call
(like vLLM's per-call ``SamplingParams``); the context length is fixed when the model is loaded.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rank1_local.cache.scope import CacheScope
from rank1_local.cache.store import JudgmentCache
from rank1_local.core.config import ScoringConfig
from rank1_local.core.duplicates import Duplicates, find_duplicates
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, PreparedPair, prepare_pairs
from rank1_local.core.results import Rank1Result, RunStats

logger = logging.getLogger(__name__)

MAX_CACHE_SCOPES = 64  # per-settings cache scopes kept (settings come from clients: the map must stay bounded)


class Stopped(Rank1Error):
    """The model is closing (or the server shutting down) and takes no new work."""


class Overloaded(Rank1Error):
    """Too many pairs are waiting already; try again later (the server answers 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Rank1Error):
    """A call with more pairs to score than may ever wait at once: it could never be admitted (the server answers
    413)."""


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...


@dataclass
class Tally:
    """Tokens a call's pairs cost where they were decoded (each prompt token counted once)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0


class Ticket:
    """One call's pairs on their way through the pipeline. The executor reports each judgment with
    :meth:`deliver` (store, fan out) or the call's failure with :meth:`fail`; ``on_result`` / ``on_error`` are the
    caller's."""

    def __init__(self, id: int, prepared: list[PreparedPair], duplicates: Duplicates, scope: CacheScope | None,
                 on_result: Callable[[Rank1Result], None], on_error: Callable[[BaseException], None],
                 counters: Counters) -> None:
        self.id = id
        self.size = len(prepared)
        self.duplicates = duplicates
        self.scope = scope
        self.tally = Tally()
        self.decoded = 0  # pairs judged by the executor for this ticket (not cache hits, not copies)
        self.started = time.perf_counter()
        self._on_result, self._on_error = on_result, on_error
        self._counters = counters
        self._lock = threading.Lock()
        self.finished = 0
        self.cancelled = False
        self.failed: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.finished >= self.size or self.cancelled

    def deliver(self, pair: PreparedPair, result: Rank1Result, *, hit: bool = False) -> None:
        """A judgment: stored in the cache (a new one), then fanned out to the pair and its duplicates."""
        if self.scope is not None and not hit:
            self.scope.store(pair, result)
        if self.cancelled:
            return
        results = self.duplicates.fan_out(result)
        with self._lock:
            if not hit:
                self.decoded += 1
            self.finished += len(results)
            finished_now = self.finished >= self.size
        self._counters.add(pairs=len(results), cache_hits=len(results) if hit else 0, requests_done=int(finished_now))
        for each in results:
            try:
                self._on_result(each)
            except Exception as exc:  # the caller's callback: it fails this ticket, no other
                logger.warning("request %d: its result callback failed (%s); the request is cancelled", self.id, exc)
                self.cancel()
                self._report(exc)
                return

    def fail(self, exc: BaseException) -> None:
        """The executor could not score this ticket's pairs."""
        with self._lock:
            if self.done:
                return
            self.cancelled = True
        self._counters.add(errors=1)
        self._report(exc)

    def cancel(self) -> int:
        """Stop: waiting pairs are dropped, running ones stop at the executor's next step; how many were left."""
        with self._lock:
            if self.done:
                return 0
            self.cancelled = True
            left = self.size - self.finished
        self._counters.add(cancelled_requests=1, cancelled_pairs=left)
        return left

    def abort(self, exc: BaseException) -> bool:
        """Cancel the ticket and tell its caller why; False when it had already ended."""
        if not self.cancel():
            return False
        self._report(exc)
        return True

    def _report(self, exc: BaseException) -> None:
        self.failed = exc
        try:
            self._on_error(exc)
        except Exception:
            logger.exception("request %d: its error callback failed too", self.id)

    def stats(self) -> RunStats:
        return RunStats(self.decoded, self.tally.prompt_tokens, self.tally.generated_tokens,
                        time.perf_counter() - self.started)


class Executor(Protocol):
    """A backend's schedule stage: scores prepared pairs and reports each with ``ticket.deliver`` (or the failure
    with ``ticket.fail``), from any thread; ``ticket.cancelled`` turning true stops its pairs."""

    def run(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> None: ...

    @property
    def waiting(self) -> int:
        """Pairs submitted but not started."""
        ...


@dataclass
class Counters:
    """Totals since start, changed under one lock (several threads deliver and submit)."""

    requests: int = 0  # calls submitted
    requests_done: int = 0  # calls with every result delivered
    pairs: int = 0  # results delivered, cache hits and copies included
    cache_hits: int = 0
    cancelled_requests: int = 0
    cancelled_pairs: int = 0
    errors: int = 0
    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass(frozen=True)
class ShutdownReport:
    """What happened to the calls in flight when draining began."""

    in_flight: int
    finished_requests: int
    cancelled_requests: int
    cancelled_pairs: int


class Pipeline:
    """prepare → judge once → look up → schedule → store → fan out, for one loaded model.

    Args:
        tokenizer: the model's tokenizer (thread-safe).
        executor: the backend's schedule stage.
        default_config: the settings a call without its own gets; its ``n_ctx`` is fixed.
        check_config: the backend's refusal of settings it cannot honour (raises :class:`Rank1Error`).
        cache: a judgment cache, with ``model_path`` (the GGUF its keys hash) and ``cache_settings(config)`` (what
            besides the model and prompt decides a judgment).
        max_waiting: pairs that may wait for the executor at once (None: no limit); more is :class:`Overloaded`.
    """

    def __init__(self, tokenizer: Tokenizer, executor: Executor, default_config: ScoringConfig, *,
                 check_config: Callable[[ScoringConfig], None] | None = None, cache: JudgmentCache | None = None,
                 model_path: Path | None = None,
                 cache_settings: Callable[[ScoringConfig], Mapping[str, Any]] | None = None,
                 max_waiting: int | None = None) -> None:
        self.tokenizer, self.executor = tokenizer, executor
        self.default_config = default_config
        self._check_config = check_config
        self.cache, self.model_path, self._cache_settings = cache, model_path, cache_settings
        self.max_waiting = max_waiting
        self.counters = Counters()
        self._scopes: OrderedDict[ScoringConfig, CacheScope] = OrderedDict()
        self._tickets: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._drain_start: tuple[int, int, int] | None = None
        self.last_stats: RunStats | None = None

    # --- stages ------------------------------------------------------------------------------------------------
    def config_for(self, config: ScoringConfig | None) -> ScoringConfig:
        """The call's settings (the default when None), checked: ``n_ctx`` is fixed at load, and the backend may
        refuse others."""
        config = config or self.default_config
        if not isinstance(config, ScoringConfig):
            raise Rank1Error(f"config must be a ScoringConfig, got {type(config).__name__}")
        if config.n_ctx != self.default_config.n_ctx:
            raise Rank1Error(f"n_ctx is fixed when the model is loaded ({self.default_config.n_ctx}); load it again "
                             f"for {config.n_ctx}")
        if self._check_config is not None:
            self._check_config(config)
        return config

    def prepare(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig) -> list[PreparedPair]:
        return prepare_pairs(pairs, config, self.tokenizer.tokenize, self.tokenizer.detokenize)

    @staticmethod
    def judge_once(prepared: list[PreparedPair]) -> Duplicates:
        duplicates = find_duplicates(prepared)
        if duplicates.copies:
            logger.info("%d of %d pairs repeat an earlier pair's prompt: each prompt is judged once",
                        duplicates.count, len(prepared))
        return duplicates

    def scope(self, config: ScoringConfig) -> CacheScope | None:
        """The judgment cache's scope for these settings (None without a cache); the most recent few are kept."""
        if self.cache is None or self.model_path is None or self._cache_settings is None:
            return None
        with self._lock:
            scope = self._scopes.get(config)
            if scope is not None:
                self._scopes.move_to_end(config)
                return scope
        scope = self.cache.scope(self.model_path, self._cache_settings(config))
        with self._lock:
            self._scopes[config] = scope
            while len(self._scopes) > MAX_CACHE_SCOPES:
                self._scopes.popitem(last=False)
        return scope

    def look_up(self, pairs: list[PreparedPair], scope: CacheScope | None) -> dict[int, Rank1Result]:
        hits = scope.lookup(pairs) if scope is not None else {}
        if hits:
            logger.info("judgment cache: %d of %d pairs already judged", len(hits), len(pairs))
        return hits

    def admit(self, n: int) -> None:
        """Refuse a call whose pairs would make the executor's waiting line longer than ``max_waiting``: for now
        (:class:`Overloaded`), or for good when they are more than it ever holds (:class:`TooLarge`)."""
        if self.max_waiting is not None and n > self.max_waiting:
            raise TooLarge(f"this request has {n} pairs to score, more than the {self.max_waiting} that may wait at "
                           "once (--max-queue): it could never be admitted; send fewer documents per request")
        if self.max_waiting is not None and n and self.executor.waiting + n > self.max_waiting:
            raise Overloaded(f"{self.executor.waiting} pairs are waiting already and this request adds {n}, over "
                             f"the limit of {self.max_waiting} (--max-queue); try again shortly", retry_after=1.0)

    # --- calls -------------------------------------------------------------------------------------------------
    def submit(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig | None,
               on_result: Callable[[Rank1Result], None], on_error: Callable[[BaseException], None]) -> Ticket:
        """Run ``pairs`` through every stage; results reach ``on_result`` as they finish, in any order
        (``result.index`` is the position in ``pairs``; cache hits first). Thread-safe."""
        if self._closed:
            raise Stopped("the model is closing and takes no new work")
        config = self.config_for(config)
        prepared = self.prepare(pairs, config)
        duplicates = self.judge_once(prepared)
        scope = self.scope(config)
        hits = self.look_up(duplicates.unique, scope)
        misses = [p for p in duplicates.unique if p.index not in hits]
        self.admit(len(misses))
        ticket = Ticket(next(self._ids), prepared, duplicates, scope, on_result, on_error, self.counters)
        self.counters.add(requests=1)
        with self._lock:
            if self._closed:
                raise Stopped("the model is closing and takes no new work")
            if misses:
                self._tickets[ticket.id] = ticket
        by_index = {p.index: p for p in duplicates.unique}
        for index in sorted(hits):
            ticket.deliver(by_index[index], hits[index], hit=True)
        if misses and not ticket.cancelled:
            try:
                self.executor.run(ticket, misses, config)
            except BaseException:
                self.forget(ticket)
                raise
        if ticket.done:
            self.forget(ticket)
        return ticket

    def score(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig | None = None,
              on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        """Run ``pairs`` and wait: results in input order. ``on_result`` sees each as it finishes, in this thread."""
        inbox: queue.SimpleQueue[Rank1Result | BaseException] = queue.SimpleQueue()
        ticket = self.submit(pairs, config, inbox.put, inbox.put)
        results: dict[int, Rank1Result] = {}
        try:
            while len(results) < ticket.size:
                item = inbox.get()
                if isinstance(item, BaseException):
                    raise item
                results[item.index] = item
                if on_result is not None:
                    on_result(item)
        finally:
            if len(results) < ticket.size:
                self.cancel(ticket)
            self.forget(ticket)
        self.last_stats = ticket.stats()
        return [results[i] for i in range(ticket.size)]

    def cancel(self, ticket: Ticket) -> int:
        left = ticket.cancel()
        if left:
            logger.info("request %d cancelled: %d of its %d pairs not scored", ticket.id, left, ticket.size)
        self.forget(ticket)
        return left

    def forget(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.pop(ticket.id, None)

    @property
    def open_tickets(self) -> int:
        with self._lock:
            for ticket_id in [i for i, t in self._tickets.items() if t.done]:
                del self._tickets[ticket_id]
            return len(self._tickets)

    # --- shutting down -----------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Take no new calls (they get :class:`Stopped`); those in flight go on."""
        with self._lock:
            if self._drain_start is None:
                self._drain_start = (len([t for t in self._tickets.values() if not t.done]),
                                     self.counters.cancelled_requests, self.counters.cancelled_pairs)
            self._closed = True

    def abort(self, reason: str) -> int:
        """Cancel every call in flight and tell each why (:class:`Stopped`); how many there were."""
        with self._lock:
            left = [t for t in self._tickets.values() if not t.done]
        for ticket in left:
            self.forget(ticket)
            ticket.abort(Stopped(reason))
        return len(left)

    def stop(self, timeout: float, reason: str = "the model was closed before this call finished") -> ShutdownReport:
        """Take no new calls, let those in flight finish for up to ``timeout`` seconds, then cancel the rest (each
        gets :class:`Stopped` with ``reason``)."""
        self.drain()
        deadline = time.monotonic() + timeout
        while self.open_tickets and time.monotonic() < deadline:
            time.sleep(0.02)
        self.abort(reason)
        assert self._drain_start is not None
        in_flight, cancelled0, pairs0 = self._drain_start
        cancelled = self.counters.cancelled_requests - cancelled0
        return ShutdownReport(in_flight=in_flight, finished_requests=max(0, in_flight - cancelled),
                              cancelled_requests=cancelled,
                              cancelled_pairs=self.counters.cancelled_pairs - pairs0)


ScoreBatch = Callable[[list[PreparedPair], ScoringConfig, Callable[[PreparedPair, Rank1Result], None],
                       Callable[[], bool]], None]


class SerialExecutor:
    """The schedule stage of a backend that scores in the calling thread (transformers, vLLM): one call at a time
    (the model has one owner at a time: this lock), each result delivered as the backend reports it.

    ``score(pairs, config, deliver, cancelled)`` reports every pair with ``deliver(pair, result)`` and may stop early
    once ``cancelled()`` is true."""

    waiting = 0  # nothing waits: a call runs while its caller waits

    def __init__(self, score: ScoreBatch) -> None:
        self._score = score
        self._lock = threading.Lock()

    def run(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> None:
        def deliver(pair: PreparedPair, result: Rank1Result) -> None:
            ticket.tally.prompt_tokens += result.n_prompt_tokens
            ticket.tally.generated_tokens += result.n_tokens
            ticket.deliver(pair, result)

        with self._lock:
            try:
                self._score(pairs, config, deliver, lambda: ticket.cancelled)
            except Exception as exc:  # the caller sees it (Pipeline.score raises it)
                ticket.fail(exc)
