"""Continuous batching of rank1 pairs on one llama.cpp context.

Sequence 0 holds the prompt prefix shared by the passages of the current query
(``"Determine…\\nQuery: {q}\\nPassage: "`` as tokens); each of the ``parallel`` slots (sequences
1..parallel) starts from a copy of it (in the unified KV cache the cells are shared, not copied),
evaluates its passage, then reasons greedily. When the next query's prefix is loaded, the tokens it shares
with the previous one (the instruction head) stay in sequence 0's cache; when queries interleave (several callers'
work at once), a pair copies the prefix from a running pair of its query, or evaluates the query's part in its own
slot within the batch (no extra ``llama_decode`` call per query switch). All active slots advance together in one
``llama_decode`` call per step, and a finished slot takes the next pair at once. What each output row means (feed the
chosen token, read the answer, force it, rethink, stop with the score) is decided by the pair's
:class:`~rank1_local.core.decoder.PairDecoder`: the scheduler only keeps slots and the KV cache.

:class:`Admission` decides which job a free slot takes and how its prefix gets into the cache. The scheduler is driven by one thread only (the context's owner, see
:mod:`rank1_local.backends.llama.owner`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rank1_local.backends.llama.engine import BatchEntry
from rank1_local.core.cards import RANK1, ModelCard
from rank1_local.core.config import ScoringConfig
from rank1_local.core.decoder import Become, Feed, PairDecoder, Row, RowUnavailable
from rank1_local.core.pairs import PreparedPair, tokenize_spans
from rank1_local.core.protocol import common_prefix_len
from rank1_local.core.results import Rank1Result, RunStats, too_long_result
from rank1_local.pipeline import Tally

PREFIX_SEQ = 0


class Engine(Protocol):
    """What the scheduler needs from a decoding engine (:class:`LlamaEngine`, or a scripted one in tests)."""

    n_batch: int

    def tokenize(self, text: str) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...
    def seq_copy(self, src: int, dst: int) -> None: ...
    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None: ...
    def clear(self) -> None: ...
    def decode(self, entries: list[BatchEntry]) -> Mapping[int, Row]:
        """Evaluate the batch; the output row of every entry that asks for one (valid until the next call)."""
        ...


@dataclass(frozen=True, eq=False)
class Job:
    pair: PreparedPair
    shared: int  # leading prompt tokens equal to the query's shared prefix
    config: ScoringConfig  # the protocol settings of this pair
    owner: Any = None  # who submitted it (a ticket), for on_result and cancelled
    tally: Tally = field(default_factory=Tally)

    @property
    def prefix(self) -> list[int]:
        return self.pair.ids[:self.shared]


class JobSource(Protocol):
    """Where the scheduler takes its next job: ``None`` means none now (``block=False``) or none ever again.
    ``interleaved`` is true while jobs of several callers alternate (their queries are mixed)."""

    interleaved: bool

    def next_job(self, block: bool) -> Job | None: ...


class ListSource:
    """A fixed list of jobs, in order (grouped by query: see :func:`make_jobs`)."""

    interleaved = False

    def __init__(self, jobs: Iterable[Job]) -> None:
        self._jobs = deque(jobs)

    def next_job(self, block: bool) -> Job | None:
        return self._jobs.popleft() if self._jobs else None


def make_jobs(prepared: list[PreparedPair], tokenize: Callable[[str], list[int]], config: ScoringConfig, *,
              owner: Any = None, tally: Tally | None = None, card: ModelCard = RANK1) -> list[Job]:
    """One job per pair, each query's passages together so that the query's prefix is evaluated once."""
    prefixes: dict[str, list[int]] = {}
    bos = len(tokenize(""))
    for query in dict.fromkeys(p.query for p in prepared):
        ids = tokenize_spans(card, card.shared_text(query), tokenize)
        # the prefix's last token may merge with the passage's first one: never share it
        prefixes[query] = ids[:max(bos, len(ids) - 1)]
    tally = tally or Tally()
    by_query: dict[str, list[Job]] = {}
    for pair in prepared:
        prefix = prefixes[pair.query]
        shared = min(len(prefix), len(pair.ids) - 1) if pair.ids[:len(prefix)] == prefix else 0
        by_query.setdefault(pair.query, []).append(Job(pair, shared, config, owner, tally))
    return [job for jobs in by_query.values() for job in jobs]


@dataclass(frozen=True)
class SchedulerParams:
    parallel: int
    true_id: int  # the card's positive and negative answer tokens
    false_id: int
    reasons: bool = True  # the card reasons first (rank1); else its answer is read at the end of the prompt


@dataclass
class _Slot:
    seq: int
    job: Job | None = None
    decoder: PairDecoder | None = None
    tokens: list[int] = field(default_factory=list)  # tokens already in this sequence's KV cache
    pending: list[int] = field(default_factory=list)  # tokens to feed next
    host_row: bool = False  # its next row must be read from the full logits (the device's candidates fell short)

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def reasoning(self) -> bool:
        """Feeding one token per step (generated text), not a prompt chunk."""
        return self.busy and len(self.pending) <= 1


class Admission:
    """Which job a free slot takes next, and where its prefix comes from.

    A job whose query prefix is not in sequence 0 copies it from a running pair of the same query if there is one.
    Otherwise, while callers' jobs interleave, it starts from what sequence 0 shares with it (the instruction head)
    and evaluates the rest of its prefix in its own slot, within the batch; with jobs grouped by query (one caller),
    the prefix is loaded into sequence 0 once for all the query's pairs: while other pairs generate, inside their
    next batch (they do not wait for it), the query's first pair starting in the step after."""

    def __init__(self, scheduler: Scheduler, source: JobSource, cancelled: Callable[[Job], bool] | None,
                 on_result: Callable[[Job, Rank1Result], None]) -> None:
        self.scheduler, self.source, self.cancelled, self.on_result = scheduler, source, cancelled, on_result
        self.held: Job | None = None  # a job waiting for its query's prefix, which the next batch evaluates
        self.exhausted = False  # the source has no job left, ever

    def _is_cancelled(self, job: Job) -> bool:
        return self.cancelled is not None and self.cancelled(job)

    def _next(self, slots: list[_Slot]) -> Job | None:
        """The next job to start, or None (none now, or its prefix is still being loaded)."""
        sched = self.scheduler
        while True:
            if self.held is not None:
                if sched.prefix_todo:
                    return None  # it starts once its prefix is in sequence 0
                job, self.held = self.held, None
            else:
                job = self.source.next_job(block=not any(s.busy for s in slots))
                if job is None:
                    self.exhausted = not any(s.busy for s in slots)
                    return None
                if job.pair.too_long and not self._is_cancelled(job):  # never run, as in the official code
                    sched.n_results += 1
                    self.on_result(job, too_long_result(job.pair))
                    continue
            if not self._is_cancelled(job):
                return job

    def fill(self, slots: list[_Slot]) -> None:
        """Give each free slot a job, while there are jobs that can start now."""
        sched = self.scheduler
        for slot in slots:
            if slot.busy and self._is_cancelled(slot.job):  # type: ignore[arg-type]
                sched.free(slot)
            while not slot.busy and not self.exhausted:
                job = self._next(slots)
                if job is None:
                    break
                origin, keep = PREFIX_SEQ, job.shared
                if sched.prefix != job.prefix:
                    sibling = sched.sibling(slots, job)
                    if sibling is not None:
                        origin = sibling.seq
                    elif self.source.interleaved and sched.prefix:
                        keep = min(common_prefix_len(sched.prefix, job.prefix), job.shared)
                    else:
                        # a serial load would stall the slots already generating; before any generates (at the
                        # start), it only adds a prompt chunk and every slot starts at once
                        sched.load_prefix(job, in_batch=any(s.reasoning for s in slots))
                        if sched.prefix_todo:
                            self.held = job
                            break
                sched.start(slot, job, origin, keep)


class Scheduler:
    def __init__(self, engine: Engine, params: SchedulerParams) -> None:
        self.engine = engine
        self.params = params
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.n_results = 0
        self.active = 0  # slots holding a pair
        self.prefix: list[int] = []  # the tokens sequence 0 holds (or will, once ``prefix_todo`` is evaluated)
        self.prefix_todo: list[int] = []  # the end of ``prefix``, evaluated in the next batch beside running slots
        self._prefix_tally: Tally | None = None  # whose pair the prefix being loaded is for

    # --- sequence 0: the current query's prefix -----------------------------------------------------------------
    def load_prefix(self, job: Job, *, in_batch: bool) -> None:
        """Make sequence 0 hold ``job``'s prefix, keeping what it shares with the previous query's prefix (the
        instruction head and ``Query:``), so only the query-specific tail is evaluated: at once, or with
        ``in_batch`` in the next batches beside the running slots (which then need not wait for it)."""
        keep = common_prefix_len(self.prefix, job.prefix)
        self.engine.seq_remove(PREFIX_SEQ, keep, -1)  # cells still used by running slots stay
        self.prefix, self.prefix_todo, self._prefix_tally = job.prefix, job.prefix[keep:], job.tally
        if not in_batch:
            while self.prefix_todo:
                self.engine.decode(self._prefix_entries(self.engine.n_batch))

    def _prefix_entries(self, room: int) -> list[BatchEntry]:
        """Up to ``room`` of the prefix tokens still to evaluate in sequence 0 (no logits)."""
        take, self.prefix_todo = self.prefix_todo[:room], self.prefix_todo[room:]
        base = len(self.prefix) - len(self.prefix_todo) - len(take)
        self._count_prompt(self._prefix_tally, len(take))
        return [BatchEntry(t, base + k, PREFIX_SEQ, False) for k, t in enumerate(take)]

    def _count_prompt(self, tally: Tally | None, n: int) -> None:
        self.prompt_tokens += n
        if tally is not None:
            tally.prompt_tokens += n

    @staticmethod
    def sibling(slots: list[_Slot], job: Job) -> _Slot | None:
        """A running slot whose cache already holds ``job``'s prefix (a pair of the same query)."""
        for s in slots:
            if s.busy and len(s.tokens) >= job.shared and s.tokens[:job.shared] == job.prefix:
                return s
        return None

    # --- slots ---------------------------------------------------------------------------------------------------
    def start(self, slot: _Slot, job: Job, origin: int, keep: int) -> None:
        """Start ``job`` in ``slot`` from the first ``keep`` prompt tokens' cells of sequence ``origin`` (sequence 0,
        or a sibling slot: cells are shared, not copied); the rest of the prompt is evaluated in the slot."""
        self.engine.seq_remove(slot.seq)
        self.engine.seq_copy(origin, slot.seq)
        self.engine.seq_remove(slot.seq, keep, -1)
        slot.job = job
        self.active += 1
        slot.decoder = PairDecoder(job.pair, job.config, job.config.n_ctx, self.engine,
                                   (self.params.true_id, self.params.false_id), reasons=self.params.reasons)
        slot.tokens = job.pair.ids[:keep]
        slot.pending = job.pair.ids[keep:]
        slot.host_row = slot.decoder.answering  # the answer's two logits: from the full row at once

    def free(self, slot: _Slot) -> None:
        self.engine.seq_remove(slot.seq)
        self.active -= 1
        slot.job, slot.decoder, slot.host_row = None, None, False
        slot.tokens, slot.pending = [], []

    def _continue_from_ids(self, slot: _Slot, ids: list[int]) -> None:
        """Make the slot's sequence ``ids``: keep the cells it shares with them, feed the rest."""
        keep = min(common_prefix_len(slot.tokens, ids), len(ids) - 1)
        self.engine.seq_remove(slot.seq, keep, -1)
        slot.tokens = slot.tokens[:keep]
        slot.pending = ids[keep:]

    def _step(self, slot: _Slot, row: Row) -> Rank1Result | None:
        """Carry out what the slot's decoder makes of the row after its pending tokens were all fed."""
        decoder, job = slot.decoder, slot.job
        assert decoder is not None and job is not None
        generated = decoder.generated
        try:
            action = decoder.step(row)
        except RowUnavailable:  # a device row without what the decoder asks: evaluate its last token again
            last = slot.tokens.pop()
            self.engine.seq_remove(slot.seq, len(slot.tokens), -1)
            slot.pending, slot.host_row = [last], True
            return None
        slot.host_row = False
        new = decoder.generated - generated
        self.generated_tokens += new
        job.tally.generated_tokens += new
        if isinstance(action, Feed):
            slot.pending = [action.token]
        elif isinstance(action, Become):
            self._continue_from_ids(slot, action.ids)
        else:
            result = decoder.result(action.score)
            self.free(slot)
            return result
        return None

    def _feed(self, slot: _Slot, entries: list[BatchEntry], owners: dict[int, _Slot]) -> None:
        """Add as many of ``slot``'s pending tokens as the batch has room for; the entry of its last one asks for
        logits (``owners`` maps that entry to the slot)."""
        room = self.engine.n_batch - len(entries)
        if room <= 0:
            return
        take = slot.pending[:room]
        done = len(take) == len(slot.pending)
        base = len(slot.tokens)
        for k, token in enumerate(take):
            last = done and k == len(take) - 1
            if last:
                owners[len(entries)] = slot
            entries.append(BatchEntry(token, base + k, slot.seq, last, host=last and slot.host_row))
        slot.tokens += take
        slot.pending = slot.pending[len(take):]
        if len(take) > 1 or (slot.decoder is not None and slot.decoder.chain.n_tokens == 0):
            assert slot.job is not None
            self._count_prompt(slot.job.tally, len(take))

    def _decode_step(self, slots: list[_Slot], on_result: Callable[[Job, Rank1Result], None]) -> None:
        """One ``llama_decode`` call: one token per reasoning slot first, then a new query's prefix, then prompt
        chunks in the room left; then each slot acts on its logits."""
        entries: list[BatchEntry] = []
        owners: dict[int, _Slot] = {}
        prompts = [s for s in slots if s.busy and not s.reasoning]
        for slot in slots:
            if slot.reasoning:
                self._feed(slot, entries, owners)
        if self.prefix_todo:
            entries += self._prefix_entries(self.engine.n_batch - len(entries))
        for slot in prompts:
            self._feed(slot, entries, owners)
        rows = self.engine.decode(entries)
        for i, slot in owners.items():
            job = slot.job
            assert job is not None
            result = self._step(slot, rows[i])
            if result is not None:
                self.n_results += 1
                on_result(job, result)

    # --- driving -------------------------------------------------------------------------------------------------
    def run(self, jobs: Iterable[Job], on_result: Callable[[Rank1Result], None] | None = None,
            cancelled: Callable[[Job], bool] | None = None) -> tuple[list[Rank1Result], RunStats]:
        """Score ``jobs``; results sorted by pair index. ``on_result`` sees each as it finishes; a job for which
        ``cancelled(job)`` turns true is dropped (its slot freed) and gets no result."""
        results: list[Rank1Result] = []

        def collect(job: Job, result: Rank1Result) -> None:
            results.append(result)
            if on_result:
                on_result(result)

        stats = self.serve(ListSource(jobs), collect, cancelled)
        return sorted(results, key=lambda r: r.index), stats

    def serve(self, source: JobSource, on_result: Callable[[Job, Rank1Result], None],
              cancelled: Callable[[Job], bool] | None = None) -> RunStats:
        """Score jobs from ``source`` until it has none left (it may block while it waits for more): a free slot
        takes the next job at once (:class:`Admission`). ``on_result(job, result)`` sees each result."""
        start = time.perf_counter()
        self.prompt_tokens = self.generated_tokens = self.n_results = self.active = 0
        slots = [_Slot(seq=i + 1) for i in range(self.params.parallel)]
        self.engine.clear()
        self.prefix, self.prefix_todo = [], []
        admission = Admission(self, source, cancelled, on_result)
        while True:
            admission.fill(slots)
            if not self.active and not self.prefix_todo:
                if admission.exhausted:
                    break
                continue
            self._decode_step(slots, on_result)
        return RunStats(self.n_results, self.prompt_tokens, self.generated_tokens, time.perf_counter() - start)
