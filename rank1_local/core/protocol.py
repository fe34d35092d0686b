"""The rank1 scoring rules, written once and used by every backend (llama.cpp, transformers, vLLM).

Two protocols (``ScoringConfig.protocol``):

- ``official``: what the official code (orionw/rank1, ``rank1.py``, vLLM) does. Generation stops when the decoded
  text contains ``"</think> true"`` or ``"</think> false"`` (so ``</think>`` followed by anything else goes on),
  at end of sequence, when the budget (every generated token, the answer included) or the context is used up.
  The score comes from the top-20 log-probabilities of the *last generated position*: if both answers are there,
  P(true) / (P(true) + P(false)); otherwise, or when generation stopped without a stop string and an answer is
  missing, the fallback decides.
- ``full``: the answer is read from the full next-token distribution right after ``</think>``; the fallback
  decides only when the reasoning does not close.

The fallback (both): the generated text is cut back to its last sentence end (:func:`cut_reasoning`), the
prompt continued with ``"\n" + cut + "\n</think>"``, and the answer read from " true" vs " false" there; a
fallback prompt longer than the context scores 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from rank1_local.core.errors import UnsupportedModelError
from rank1_local.core.prompt import THINK_CLOSE

THINK_CLOSE_BYTES = THINK_CLOSE.encode()
RETHINK_SUFFIX = "\nWait"
SENTENCE_ENDS = ".!?"
STOP_STRINGS = (THINK_CLOSE + " true", THINK_CLOSE + " false")
TOP_LOGPROBS = 20
PROTOCOLS = ("official", "full")
NO_SCORE = 0.5  # what the official code gives a pair it cannot score at all


def true_false_score(logit_true: float, logit_false: float) -> float:
    """P(" true") / (P(" true") + P(" false")), computed stably from the two logits."""
    d = logit_false - logit_true
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def cut_reasoning(text: str) -> str:
    """The official cut of an unfinished reasoning: ``rstrip``; unless it then ends in '.', '!' or '?', cut after the
    last of those *if there is one* (otherwise keep it all); ``strip``."""
    text = text.rstrip()
    if not text.endswith(tuple(SENTENCE_ENDS)):
        last = max(text.rfind(c) for c in SENTENCE_ENDS)
        if last != -1:
            text = text[:last + 1]
    return text.strip()


def fallback_prompt(prompt: str, generated_text: str) -> str:
    """The forced-answer prompt: prompt + "\n" + the cut reasoning + "\n</think>"."""
    return f"{prompt}\n{cut_reasoning(generated_text)}\n{THINK_CLOSE}"


def top_logprobs(logits: np.ndarray, k: int = TOP_LOGPROBS) -> dict[int, float]:
    """The ``k`` most likely next tokens and their log-probabilities (log-softmax over the whole vocabulary), as
    vLLM's ``logprobs=k`` returns them."""
    logits = np.asarray(logits, dtype=np.float64)
    top = np.argpartition(-logits, k - 1)[:k] if len(logits) > k else np.arange(len(logits))
    peak = logits.max()
    log_z = peak + math.log(float(np.exp(logits - peak).sum()))
    return {int(i): float(logits[i] - log_z) for i in top}


def answer_score(top: Mapping[int, float], true_id: int, false_id: int) -> float | None:
    """P(true) / (P(true) + P(false)) from a top-k log-probability map, or None when either answer is missing
    (the official code then falls back; a missing answer never counts as probability 0)."""
    if true_id not in top or false_id not in top:
        return None
    return true_false_score(top[true_id], top[false_id])


def common_prefix_len(a: list[int] | str, b: list[int] | str) -> int:
    """How many leading items (tokens or characters) ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def answer_token_ids(tokenize: Callable[[str], list[int]], answers: tuple[str, str] = (" true", " false"),
                     card: str = "rank1") -> tuple[int, int]:
    """The single-token ids of a card's two answers (rank1: " true" and " false"; a BOS the tokenizer adds is
    ignored); a vocabulary without them is not this card's model."""
    bos = len(tokenize(""))
    ids = [tokenize(word)[bos:] for word in answers]
    if any(len(i) != 1 for i in ids):
        raise UnsupportedModelError(f"the vocabulary has no single {answers[0]!r} / {answers[1]!r} tokens: this is "
                                    f"not a {card} model (the cards: rank1, qwen3-reranker; --card names one)")
    return ids[0][0], ids[1][0]


class Step(Enum):
    """What a backend does after :meth:`ReasoningChain.advance`."""

    CONTINUE = "continue"  # feed the token and generate the next one
    FINISH = "finish"  # (official) generation ended: score from this position's top-20, else fall back
    ANSWER = "answer"  # (full) the reasoning closed: feed the token; the answer distribution is at the next position
    FORCE = "force"  # (full) the reasoning did not close: score the fallback prompt (``chain.fallback_prompt``)
    RETHINK = "rethink"  # budget forcing: continue from ``prompt + chain.text`` (``</think>`` became ``\nWait``)


@dataclass
class ReasoningChain:
    """The reasoning of one pair as it is generated, and the rules that end it.

    Text is kept as bytes, so a multi-byte character split over tokens never breaks the detection of
    ``</think>`` or a stop string.
    """

    prompt: str
    budget: int
    rethinks_left: int = 0
    official: bool = True
    n_ctx: int | None = None
    text: bytearray = field(default_factory=bytearray)
    n_tokens: int = 0
    forced: bool = False
    stopped_at: int = -1  # (official) where the stop string begins in ``text``

    def advance(self, token: int, piece: bytes, end_of_generation: bool, seq_len: int = 0) -> Step:
        """Account for one greedily chosen token (``piece`` is its text; ``seq_len`` the sequence length with it)
        and say what comes next."""
        if end_of_generation:
            if self.official:
                self.n_tokens += 1  # vLLM returns the end-of-sequence token among the generated ones
                return Step.FINISH
            self.forced = True
            return Step.FORCE
        self.n_tokens += 1
        self.text += piece
        close = self.text.find(THINK_CLOSE_BYTES)
        if close >= 0 and self.rethinks_left > 0 and self.n_tokens < self.budget:
            self.rethinks_left -= 1
            del self.text[close:]
            self.text += RETHINK_SUFFIX.encode()
            return Step.RETHINK
        if self.official:
            found = [i for i in (self.text.find(s.encode()) for s in STOP_STRINGS) if i >= 0]
            if found:
                self.stopped_at = min(found)
                return Step.FINISH
        elif close >= 0:
            return Step.ANSWER
        # the context: as vLLM 0.7.2 (the official pin) ended a sequence, once it is longer than n_ctx
        if self.n_tokens >= self.budget or (self.n_ctx is not None and seq_len > self.n_ctx):
            if self.official:
                return Step.FINISH
            self.forced = True
            return Step.FORCE
        return Step.CONTINUE

    @property
    def output_text(self) -> str:
        """The generated text as vLLM returns it: without the stop string and what follows it."""
        text = self.text[:self.stopped_at] if self.stopped_at >= 0 else self.text
        return text.decode("utf-8", "replace")

    @property
    def reasoning(self) -> str:
        """The text before ``</think>`` (all of it when the reasoning never closed)."""
        close = self.text.find(THINK_CLOSE_BYTES)
        return (self.text[:close] if close >= 0 else self.text).decode("utf-8", "replace")

    @property
    def continuation_prompt(self) -> str:
        """Prompt plus the reasoning so far (after a rethink: ending in ``\nWait``)."""
        return self.prompt + self.text.decode("utf-8", "replace")

    @property
    def fallback_prompt(self) -> str:
        return fallback_prompt(self.prompt, self.output_text)
