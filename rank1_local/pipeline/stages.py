"""The one path from input pairs to results: :class:`Pipeline`, the :class:`~rank1_local.core.engine.ScoringEngine`
of every backend and caller (library calls, run files, the server, Ray).

Named stages, in order:

1. **admit** — the call's pairs are reserved against the waiting limit at once, under one lock, before anything is
   tokenized (:mod:`rank1_local.pipeline.admission`);
2. **prepare** — validate, format and tokenize every pair (:func:`rank1_local.core.pairs.prepare_pairs`), all of them
   before anything is scored, in the caller's thread;
3. **judge once** — pairs whose prompts are the same text share one judgment (:mod:`rank1_local.core.duplicates`);
4. **look up** — pairs already judged by this model file under these settings come from the judgment cache;
5. **schedule** — the rest go to the backend's :class:`Executor`, the thread that owns its model (for llama.cpp,
   where every caller's pairs share one continuous batch);
6. **store** — each new judgment goes to the cache's writer thread (never written on the decode thread);
7. **fan out** — each result, and a copy for every duplicate, reaches the call's ticket, where its caller takes it.

A call is a :class:`~rank1_local.pipeline.tickets.Ticket`; cancelling it (or leaving its results early) drops its
waiting pairs from the executor at once and gives back its admission. Protocol settings come with each call (like
vLLM's per-call ``SamplingParams``); the context length is fixed when the model is loaded.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rank1_local.cache.scope import CacheScope
from rank1_local.cache.store import JudgmentCache
from rank1_local.core.cards import RANK1, ModelCard
from rank1_local.core.config import ScoringConfig
from rank1_local.core.duplicates import Duplicates, find_duplicates
from rank1_local.core.engine import EngineStats, Lifecycle, ShutdownReport
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, PreparedPair, prepare_pairs
from rank1_local.core.results import Rank1Result
from rank1_local.pipeline.admission import Admission
from rank1_local.pipeline.counters import Counters
from rank1_local.pipeline.tickets import Stopped, Ticket

logger = logging.getLogger(__name__)

MAX_CACHE_SCOPES = 64  # per-settings cache scopes kept (settings come from clients: the map must stay bounded)


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...


class Executor(Protocol):
    """A backend's schedule stage (an :class:`~rank1_local.pipeline.owner.OwnerThread`): queues prepared pairs and
    reports each with ``ticket.deliver`` (or the failure with ``ticket.fail``) from its own thread."""

    slots: int  # pairs it decodes together
    active_slots: int

    def run(self, ticket: Ticket, pairs: list[PreparedPair], config: ScoringConfig) -> None:
        """Queue ``pairs`` (without waiting for them)."""
        ...

    def cancel(self, ticket: Ticket) -> None:
        """Drop the ticket's waiting pairs now (its running ones stop at the next step)."""
        ...

    @property
    def tokens(self) -> tuple[int, int]:
        """(prompt, generated) tokens decoded since start."""
        ...


def distinct_pairs(pairs: Sequence[Any]) -> int:
    """How many different pairs a call holds, as written (an upper bound of what it costs the backend)."""
    return len({repr(p) for p in pairs})


class Pipeline:
    """admit → prepare → judge once → look up → schedule → store → fan out, for one loaded model.

    Args:
        tokenizer: the model's tokenizer (thread-safe).
        executor: the backend's schedule stage.
        default_config: the settings a call without its own gets; its ``n_ctx`` is fixed.
        backend, device: the library that runs the model, and where (for stats).
        check_config: the backend's refusal of settings it cannot honour (raises :class:`Rank1Error`).
        card: the model's card (how its prompts are built; :mod:`rank1_local.core.cards`).
        cache: a judgment cache, with ``model_path`` (the file its keys hash) and ``cache_settings(config)`` (what
            besides the model and prompt decides a judgment).
        max_waiting: pairs that may wait for the executor at once (None: no limit).
    """

    def __init__(self, tokenizer: Tokenizer, executor: Executor, default_config: ScoringConfig, *, backend: str,
                 device: str, check_config: Callable[[ScoringConfig], None] | None = None,
                 cache: JudgmentCache | None = None, model_path: Path | None = None,
                 cache_settings: Callable[[ScoringConfig], Mapping[str, Any]] | None = None,
                 max_waiting: int | None = None, card: ModelCard = RANK1) -> None:
        self.tokenizer, self.executor = tokenizer, executor
        self.card = card
        self.default_config = default_config
        self.backend, self.device = backend, device
        self._check_config = check_config
        self.cache, self.model_path, self._cache_settings = cache, model_path, cache_settings
        self.admission = Admission(max_waiting)
        self.counters = Counters()
        self.state = Lifecycle.OPEN
        self._scopes: OrderedDict[ScoringConfig, CacheScope] = OrderedDict()
        self._tickets: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._drain_start: tuple[int, int, int] | None = None

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
        if config.derive_budgets and not self.card.reasons:
            raise Rank1Error(f"a {self.card.name} model does not reason: it has no reasoning budgets to derive "
                             "(derive_budgets / --budgets)")
        if config.prompt_template is not None and not self.card.dataset_prompts:
            raise Rank1Error(f"a {self.card.name} model takes no dataset prompt (prompt_template / --dataset / "
                             "--prompt); give each query an instruction instead")
        if self._check_config is not None:
            self._check_config(config)
        return config

    def prepare(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig) -> list[PreparedPair]:
        return prepare_pairs(pairs, config, self.tokenizer.tokenize, self.tokenizer.detokenize, self.card)

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
        if config.derive_budgets:  # the cache keeps judgments, not the cuts of other budgets: such calls go past it
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

    # --- calls -------------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.state is not Lifecycle.OPEN:
            raise Stopped("the model is closing and takes no new work")

    def submit(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig | None = None) -> Ticket:
        """Run ``pairs`` through every stage; their results reach the returned ticket as they finish, in any order
        (``result.index`` is the position in ``pairs``; cache hits first). Thread-safe. A full queue is refused at
        once (:class:`~rank1_local.pipeline.admission.Overloaded`), before anything is tokenized."""
        self._check_open()
        config = self.config_for(config)
        permit = self.admission.reserve(distinct_pairs(pairs))
        try:
            prepared = self.prepare(pairs, config)
            duplicates = self.judge_once(prepared)
            scope = self.scope(config)
            hits = self.look_up(duplicates.unique, scope)
            misses = [p for p in duplicates.unique if p.index not in hits]
            permit.shrink_to(len(misses))
            ticket = Ticket(next(self._ids), prepared, duplicates, scope, self.counters, permit, self._ended)
            with self._lock:
                self._check_open()
                if not ticket.ended:
                    self._tickets[ticket.id] = ticket
            self.counters.add(requests=1)
        except BaseException:
            permit.release_all()
            raise
        by_index = {p.index: p for p in duplicates.unique}
        for index in sorted(hits):
            ticket.deliver(by_index[index], hits[index], hit=True)
        if misses and not ticket.ended:
            try:
                self.executor.run(ticket, misses, config)
            except BaseException as exc:
                ticket.abort(exc) if isinstance(exc, Stopped) else ticket.fail(exc)
                raise
        return ticket

    def _ended(self, ticket: Ticket) -> None:
        """A ticket ended (done, cancelled, failed): forget it, and drop what it left waiting in the executor."""
        with self._lock:
            self._tickets.pop(ticket.id, None)
        if not ticket.done:
            self.executor.cancel(ticket)

    @property
    def open_tickets(self) -> int:
        with self._lock:
            return len(self._tickets)

    def stats(self) -> EngineStats:
        prompt_tokens, generated_tokens = self.executor.tokens
        return EngineStats(backend=self.backend, device=self.device, slots=self.executor.slots,
                           active_slots=self.executor.active_slots, waiting=self.admission.outstanding,
                           open_requests=self.open_tickets, prompt_tokens=prompt_tokens,
                           generated_tokens=generated_tokens, counters=self.counters.snapshot(),
                           queue_seconds=self.counters.queue_seconds.snapshot(),
                           decode_seconds=self.counters.decode_seconds.snapshot())

    # --- shutting down -----------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Take no new calls (they get :class:`Stopped`); those in flight go on."""
        with self._lock:
            if self._drain_start is None:
                self._drain_start = (len(self._tickets), self.counters.cancelled_requests,
                                     self.counters.cancelled_pairs)
            if self.state is Lifecycle.OPEN:
                self.state = Lifecycle.DRAINING

    def abort(self, reason: str) -> int:
        """Cancel every call in flight and tell each why (:class:`Stopped`); how many there were."""
        with self._lock:
            left = list(self._tickets.values())
        return sum(ticket.abort(Stopped(reason)) for ticket in left)

    def stop(self, timeout: float, reason: str = "the model was closed before this call finished") -> ShutdownReport:
        """Take no new calls, let those in flight finish for up to ``timeout`` seconds, then cancel the rest (each
        gets :class:`Stopped` with ``reason``)."""
        self.drain()
        deadline = time.monotonic() + timeout
        while self.open_tickets and time.monotonic() < deadline:
            time.sleep(0.02)
        self.abort(reason)
        self.state = Lifecycle.CLOSED
        assert self._drain_start is not None
        in_flight, cancelled0, pairs0 = self._drain_start
        cancelled = self.counters.cancelled_requests - cancelled0
        return ShutdownReport(in_flight=in_flight, finished_requests=max(0, in_flight - cancelled),
                              cancelled_requests=cancelled,
                              cancelled_pairs=self.counters.cancelled_pairs - pairs0)
