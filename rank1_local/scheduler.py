"""Continuous batching of rank1 pairs on one llama.cpp context.

Sequence 0 holds the prompt prefix shared by the passages of the current query
(``"Determine…\\nQuery: {q}\\nPassage: "`` as tokens); each of the ``parallel`` slots (sequences
1..parallel) starts from a copy of it (in the unified KV cache the cells are shared, not copied),
evaluates its passage, then reasons greedily. When the next query's prefix is loaded, the tokens it shares
with the previous one (the instruction head) stay in sequence 0's cache. All active slots advance together in one
``llama_decode`` call per step, and a finished slot takes the next pair at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rank1_local.engine import BatchEntry, LlamaEngine
from rank1_local.protocol import RETHINK_SUFFIX, THINK_CLOSE_BYTES, common_prefix_len, fallback_prompt, true_false_score
from rank1_local.results import Rank1Result, RunStats

PREFIX_SEQ = 0


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    prompt_ids: list[int]
    shared: int  # leading prompt tokens equal to the query's shared prefix
    truncated: bool = False
    passage_tokens_dropped: int = 0


@dataclass
class _Slot:
    seq: int
    job: Job | None = None
    tokens: list[int] = field(default_factory=list)  # tokens already in this sequence's KV cache
    pending: list[int] = field(default_factory=list)  # tokens to feed next
    generated: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)  # decoded reasoning since <think>
    awaiting_answer: bool = False
    forced: bool = False
    rethinks_left: int = 0
    started: float = 0.0


@dataclass(frozen=True)
class SchedulerParams:
    parallel: int
    max_think_tokens: int
    rethink_rounds: int
    true_id: int
    false_id: int


class Scheduler:
    def __init__(self, engine: LlamaEngine, params: SchedulerParams) -> None:
        self.engine = engine
        self.params = params
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._prefix: list[int] = []  # the tokens sequence 0 holds

    def _load_prefix(self, ids: list[int]) -> None:
        """Make sequence 0 hold ``ids``, keeping what it shares with the previous query's prefix (the
        instruction head and ``Query:``), so only the query-specific tail is evaluated."""
        keep = common_prefix_len(self._prefix, ids)
        self.engine.seq_remove(PREFIX_SEQ, keep, -1)  # cells still used by running slots stay
        for start in range(keep, len(ids), self.engine.n_batch):
            chunk = ids[start:start + self.engine.n_batch]
            self.engine.decode([BatchEntry(t, start + k, PREFIX_SEQ, False) for k, t in enumerate(chunk)])
        self.prompt_tokens += len(ids) - keep
        self._prefix = ids

    def _start(self, slot: _Slot, job: Job) -> None:
        self.engine.seq_remove(slot.seq)
        self.engine.seq_copy(PREFIX_SEQ, slot.seq)
        slot.job = job
        slot.tokens = job.prompt_ids[:job.shared]
        slot.pending = job.prompt_ids[job.shared:]
        slot.generated, slot.text = [], bytearray()
        slot.awaiting_answer = slot.forced = False
        slot.rethinks_left = self.params.rethink_rounds
        slot.started = time.perf_counter()

    def _continue_from_text(self, slot: _Slot, text: str) -> None:
        """Re-tokenize ``text`` (a full prompt) and feed only what differs from the cache."""
        ids = self.engine.tokenize(text)
        keep = min(common_prefix_len(slot.tokens, ids), len(ids) - 1)
        self.engine.seq_remove(slot.seq, keep, -1)
        slot.tokens = slot.tokens[:keep]
        slot.pending = ids[keep:]

    def _force_answer(self, slot: _Slot) -> None:
        assert slot.job is not None
        generated = slot.text.decode("utf-8", "replace")
        slot.forced = slot.awaiting_answer = True
        self._continue_from_text(slot, fallback_prompt(slot.job.prompt, generated))

    def _finish(self, slot: _Slot, logits: np.ndarray) -> Rank1Result:
        assert slot.job is not None
        text = bytes(slot.text)
        cut = text.find(THINK_CLOSE_BYTES)
        reasoning = (text[:cut] if cut >= 0 else text).decode("utf-8", "replace")
        score = true_false_score(float(logits[self.params.true_id]), float(logits[self.params.false_id]))
        job = slot.job
        result = Rank1Result(index=job.index, score=score, reasoning=reasoning, n_tokens=len(slot.generated),
                             forced=slot.forced, truncated=job.truncated,
                             passage_tokens_dropped=job.passage_tokens_dropped,
                             n_prompt_tokens=len(job.prompt_ids), seconds=time.perf_counter() - slot.started)
        self.engine.seq_remove(slot.seq)
        slot.job = None
        return result

    def _step(self, slot: _Slot, logits: np.ndarray) -> Rank1Result | None:
        """Act on the next-token distribution of a slot whose pending tokens were all fed."""
        if slot.awaiting_answer:
            return self._finish(slot, logits)
        assert slot.job is not None
        token = int(np.argmax(logits))
        if self.engine.is_eog(token):
            self._force_answer(slot)
            return None
        slot.generated.append(token)
        self.generated_tokens += 1
        slot.text += self.engine.piece(token)
        close = slot.text.find(THINK_CLOSE_BYTES)
        if close >= 0 and slot.rethinks_left > 0:
            slot.rethinks_left -= 1
            del slot.text[close:]
            slot.text += RETHINK_SUFFIX.encode()
            self._continue_from_text(slot, slot.job.prompt + slot.text.decode("utf-8", "replace"))
        elif close >= 0:
            slot.awaiting_answer = True  # the answer's distribution is at the next position
            slot.pending = [token]
        elif len(slot.generated) >= self.params.max_think_tokens:
            self._force_answer(slot)
        else:
            slot.pending = [token]
        return None

    def run(self, jobs: list[Job],
            on_result: Callable[[Rank1Result], None] | None = None) -> tuple[list[Rank1Result], RunStats]:
        start = time.perf_counter()
        queue = deque(jobs)
        slots = [_Slot(seq=i + 1) for i in range(self.params.parallel)]
        results: list[Rank1Result] = []
        self.engine.clear()
        self._prefix = []
        while queue or any(s.job for s in slots):
            for slot in slots:
                if slot.job is None and queue:
                    job = queue.popleft()
                    if self._prefix != job.prompt_ids[:job.shared]:
                        self._load_prefix(job.prompt_ids[:job.shared])
                    self._start(slot, job)
            # one token per reasoning slot first, then prompt chunks in the room left
            entries: list[BatchEntry] = []
            owners: dict[int, _Slot] = {}
            active = sorted((s for s in slots if s.job), key=lambda s: (len(s.pending) > 1, s.seq))
            for slot in active:
                room = self.engine.n_batch - len(entries)
                if room <= 0:
                    break
                take = slot.pending[:room]
                done = len(take) == len(slot.pending)
                base = len(slot.tokens)
                for k, token in enumerate(take):
                    last = done and k == len(take) - 1
                    if last:
                        owners[len(entries)] = slot
                    entries.append(BatchEntry(token, base + k, slot.seq, last))
                slot.tokens += take
                slot.pending = slot.pending[len(take):]
                if len(take) > 1 or not slot.generated:
                    self.prompt_tokens += len(take)
            logits = self.engine.decode(entries)
            for i, slot in owners.items():
                result = self._step(slot, logits[i])
                if result is not None:
                    results.append(result)
                    if on_result:
                        on_result(result)
        stats = RunStats(len(results), self.prompt_tokens, self.generated_tokens, time.perf_counter() - start)
        return sorted(results, key=lambda r: r.index), stats
