"""The rank1 step, written once: :class:`PairDecoder` turns each output row a backend computes for a pair into what to
do next — feed the token it chose, make the sequence another text (a rethink, the fallback's forced answer), or stop
with the score.

Exactness is the product, so every rule lives here and in :mod:`rank1_local.core.protocol`: the greedy choice (ties
go to the lowest token id, as torch's and vLLM's argmax give them), the stop strings and budget
(:class:`~rank1_local.core.protocol.ReasoningChain`), the answer from the top 20 at the last generated position, the
fallback's cut and its two-token answer, and 0.5 for a fallback prompt longer than the context. Backends only keep
sequences (the llama.cpp scheduler: slots and the KV cache; transformers: one sequence at a time) and hand each row
over as a :class:`Row`, which computes only what the decoder asks of it: the best token on most rows, the top 20 where
the protocol reads an answer, two logits at an answer position. A row read on the device (llama.cpp's sampler chain)
holds only its top candidates: when it cannot tell what is asked (:class:`RowUnavailable`), the backend evaluates that
row again on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.protocol import (
    NO_SCORE,
    TOP_LOGPROBS,
    ReasoningChain,
    Step,
    answer_score,
    fallback_prompt,
    true_false_score,
)
from rank1_local.core.results import BudgetCut, Rank1Result, build_result


class RowUnavailable(Exception):
    """The row cannot tell what was asked (a device row holds only its top candidates): evaluate it on the host."""


class Row(Protocol):
    """One output row (the next-token distribution at one position), read as lazily as the backend can."""

    def best(self) -> int:
        """The greedy choice: the token with the highest logit, the lowest id among equals."""
        ...

    def top(self, k: int) -> dict[int, float]:
        """The ``k`` best tokens and their logits (any constant offset, e.g. log-probabilities, is as good: only
        differences are read)."""
        ...

    def logits(self, ids: Sequence[int]) -> list[float]:
        """The logits of ``ids`` (:class:`RowUnavailable` when the row does not hold them)."""
        ...


class HostRow:
    """A row of full-vocabulary logits in host memory (a numpy view: nothing is copied)."""

    def __init__(self, logits: np.ndarray) -> None:
        self.values = logits

    def best(self) -> int:
        return int(np.argmax(self.values))  # the first maximum: the lowest id among equals

    def top(self, k: int) -> dict[int, float]:
        values = self.values
        ids = np.argpartition(-values, k - 1)[:k] if len(values) > k else np.arange(len(values))
        return {int(i): float(values[i]) for i in ids}

    def logits(self, ids: Sequence[int]) -> list[float]:
        return [float(self.values[i]) for i in ids]


class CandidateRow:
    """A row read on the device: its top candidates (ids and logits) only."""

    def __init__(self, ids: Sequence[int], logits: Sequence[float]) -> None:
        self.candidates = dict(zip((int(i) for i in ids), (float(v) for v in logits), strict=True))

    def best(self) -> int:
        peak = max(self.candidates.values())
        return min(i for i, v in self.candidates.items() if v == peak)

    def top(self, k: int) -> dict[int, float]:
        if k > len(self.candidates):
            raise RowUnavailable(f"the row holds {len(self.candidates)} candidates, {k} were asked")
        ranked = sorted(self.candidates.items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(ranked[:k])

    def logits(self, ids: Sequence[int]) -> list[float]:
        if any(i not in self.candidates for i in ids):
            raise RowUnavailable("the row's candidates do not hold every token asked")
        return [self.candidates[i] for i in ids]


class Vocab(Protocol):
    """What the decoder needs of the model's vocabulary."""

    def tokenize(self, text: str) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...


@dataclass(frozen=True)
class Feed:
    """Feed ``token`` (the one just chosen) and give its row next."""

    token: int


@dataclass(frozen=True)
class Become:
    """Make the sequence these ids (keeping the cells it shares with them) and give the row after them next: a
    rethink's continuation, or the fallback's forced-answer prompt."""

    ids: list[int]


@dataclass(frozen=True)
class Done:
    score: float


Action = Feed | Become | Done


class Phase(Enum):
    GENERATING = "generating"  # the next row is a reasoning position: its greedy token goes on
    ANSWERING = "answering"  # the next row is the answer's distribution (after ``</think>``, or the fallback prompt)
    CUT_ANSWERING = "cut answering"  # the next row is the answer of a smaller budget's cut chain (derive_budgets)


class PairDecoder:
    """One pair's reasoning, decided row by row.

    Args:
        pair: the prepared pair (its prompt; its token ids start the sequence).
        config: the protocol settings.
        n_ctx: the context per pair (a sequence that fills it ends there, as vLLM ends it).
        vocab: the model's tokenizer, token texts and end-of-generation test.
        answer_ids: the token ids of the card's positive and negative answers (rank1: " true" and " false").
        reasons: the card reasons first (rank1); otherwise the first row after the prompt is the answer's.
    """

    def __init__(self, pair: PreparedPair, config: ScoringConfig, n_ctx: int, vocab: Vocab,
                 answer_ids: tuple[int, int], *, reasons: bool = True) -> None:
        self.pair, self.config, self.n_ctx, self.vocab = pair, config, n_ctx, vocab
        self.true_id, self.false_id = answer_ids
        self.chain = ReasoningChain(pair.prompt, config.max_think_tokens, config.rethink_rounds,
                                    official=config.protocol == "official", n_ctx=n_ctx)
        # a card that does not reason (Qwen3-Reranker) reads its answer in the row after the prompt
        self.phase = Phase.GENERATING if reasons else Phase.ANSWERING
        self.seq_len = len(pair.ids)  # tokens in the sequence once the last action is carried out
        self.generated = 0  # tokens chosen that are not the end of generation
        self.started = time.perf_counter()
        # ScoringConfig.derive_budgets: the smaller budgets still ahead, the cuts found, and the cut chains whose
        # answer needs the fallback's prompt (each is evaluated once this chain's own score is known)
        self.budgets_ahead = list(config.derive_budgets) if reasons else []
        self.cuts: dict[int, BudgetCut] = {}
        self.cut_fallbacks: list[tuple[int, str, str]] = []  # (budget, reasoning, fallback prompt)
        self.own_score: float | None = None

    @property
    def answering(self) -> bool:
        """The next row is an answer's distribution (two logits are read from it)."""
        return self.phase in (Phase.ANSWERING, Phase.CUT_ANSWERING)

    def step(self, row: Row) -> Action:
        """What to do with the row computed after the sequence's last token."""
        if self.phase is Phase.ANSWERING:
            logit_true, logit_false = row.logits((self.true_id, self.false_id))
            return self._done(true_false_score(logit_true, logit_false))
        if self.phase is Phase.CUT_ANSWERING:
            logit_true, logit_false = row.logits((self.true_id, self.false_id))
            budget, reasoning, _ = self.cut_fallbacks.pop(0)
            self.cuts[budget] = BudgetCut(budget, true_false_score(logit_true, logit_false), reasoning, True)
            return self._next_cut()
        chain = self.chain
        # a run with a budget ending at this row would read its answer here: the top 20 are taken before anything
        # changes (a device row that cannot give them is evaluated again on the host, with nothing advanced)
        at_cut = bool(self.budgets_ahead) and chain.n_tokens + 1 == self.budgets_ahead[0] and self.config.protocol \
            == "official"
        top = row.top(TOP_LOGPROBS) if at_cut else None
        token = row.best()
        eog = self.vocab.is_eog(token)
        step = chain.advance(token, b"" if eog else self.vocab.piece(token), eog, self.seq_len + 1)
        self.generated += not eog
        if self.budgets_ahead and chain.n_tokens >= self.budgets_ahead[0]:
            budget = self.budgets_ahead.pop(0)
            if step is Step.CONTINUE:  # this chain goes on; one whose budget ends here stops here
                self._cut(budget, top)
        if step is Step.CONTINUE:
            self.seq_len += 1
            return Feed(token)
        if step is Step.ANSWER:  # the answer's distribution is at the next position
            self.phase = Phase.ANSWERING
            self.seq_len += 1
            return Feed(token)
        if step is Step.RETHINK:
            ids = self.vocab.tokenize(chain.continuation_prompt)
            self.seq_len = len(ids)
            return Become(ids)
        if step is Step.FINISH:
            score = answer_score(row.top(TOP_LOGPROBS), self.true_id, self.false_id)
            if score is not None:
                return self._done(score)
        return self._fallback()  # FINISH without both answers in the top 20, or FORCE

    def _fallback(self) -> Action:
        """The answer after the cut reasoning and ``\\n</think>``, or 0.5 when that prompt does not fit."""
        self.chain.forced = True
        ids = self.vocab.tokenize(self.chain.fallback_prompt)
        if not self.config.fits(len(ids)):
            return self._done(NO_SCORE)
        self.phase = Phase.ANSWERING
        self.seq_len = len(ids)
        return Become(ids)

    def _cut(self, budget: int, top: dict[int, float] | None) -> None:
        """The chain did not close within ``budget`` tokens: what a run with that budget gives, as :meth:`step` and
        :meth:`_fallback` would have given it at this row (the fallback's answer is read later, see
        :meth:`_next_cut`)."""
        chain = self.chain
        if top is not None:  # official: the top 20 of the budget's last position, when both answers are there
            score = answer_score(top, self.true_id, self.false_id)
            if score is not None:
                self.cuts[budget] = BudgetCut(budget, score, chain.reasoning, False)
                return
        self.cut_fallbacks.append((budget, chain.reasoning, fallback_prompt(chain.prompt, chain.output_text)))

    def _done(self, score: float) -> Action:
        """This chain's own score is known: the cut chains' fallback answers are read next, then it is done."""
        self.own_score = score
        return self._next_cut()

    def _next_cut(self) -> Action:
        while self.cut_fallbacks:
            budget, reasoning, prompt = self.cut_fallbacks[0]
            ids = self.vocab.tokenize(prompt)
            if self.config.fits(len(ids)):
                self.phase = Phase.CUT_ANSWERING
                self.seq_len = len(ids)
                return Become(ids)
            self.cut_fallbacks.pop(0)
            self.cuts[budget] = BudgetCut(budget, NO_SCORE, reasoning, True)
        assert self.own_score is not None
        return Done(self.own_score)

    def result(self, score: float) -> Rank1Result:
        chain = self.chain
        cuts = tuple(self.cuts[b] for b in sorted(self.cuts)) if self.config.derive_budgets else None
        return build_result(self.pair, score=score, reasoning=chain.reasoning, n_tokens=chain.n_tokens,
                            forced=chain.forced, seconds=time.perf_counter() - self.started, cuts=cuts)


def decode_pair(pair: PreparedPair, decoder: PairDecoder, first_row: Row,
                carry_out: Callable[[Action], Row]) -> Rank1Result:
    """Drive one pair to its result on a backend that keeps one sequence at a time: ``first_row`` is the row after
    the prompt; ``carry_out(action)`` feeds a token or makes the sequence other ids, and returns the next row."""
    row = first_row
    while True:
        action = decoder.step(row)
        if isinstance(action, Done):
            return decoder.result(action.score)
        row = carry_out(action)
