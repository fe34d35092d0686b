"""The rank1 scoring rules, written once and used by every backend.

- :func:`true_false_score`: P(" true") / (P(" true") + P(" false")) from the two logits;
- :func:`cut_to_sentence` / :func:`fallback_prompt`: the forced answer when the reasoning does not close;
- :class:`ReasoningChain`: what to do after each generated token (go on, read the answer, force it, rethink).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from rank1_local.errors import UnsupportedModelError
from rank1_local.prompt import THINK_CLOSE

THINK_CLOSE_BYTES = THINK_CLOSE.encode()
RETHINK_SUFFIX = "\nWait"
SENTENCE_ENDS = ".!?"


def true_false_score(logit_true: float, logit_false: float) -> float:
    """P(" true") / (P(" true") + P(" false")), computed stably from the two logits."""
    d = logit_false - logit_true
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def cut_to_sentence(text: str) -> str:
    """Cut generated text back to its last '.', '!' or '?' unless it already ends with one."""
    if text.endswith(tuple(SENTENCE_ENDS)):
        return text
    last = max(text.rfind(c) for c in SENTENCE_ENDS)
    return text[: last + 1] if last >= 0 else ""


def fallback_prompt(prompt: str, generated_text: str) -> str:
    """The forced-answer prompt used when the reasoning did not close: prompt + cut text + </think>."""
    return prompt + "\n" + cut_to_sentence(generated_text) + "\n" + THINK_CLOSE


def common_prefix_len(a: list[int] | str, b: list[int] | str) -> int:
    """How many leading items (tokens or characters) ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def answer_token_ids(tokenize: Callable[[str], list[int]]) -> tuple[int, int]:
    """The single-token ids of " true" and " false" (a BOS the tokenizer adds is ignored)."""
    bos = len(tokenize(""))
    ids = [tokenize(word)[bos:] for word in (" true", " false")]
    if any(len(i) != 1 for i in ids):
        raise UnsupportedModelError("the vocabulary has no single ' true' / ' false' tokens; "
                                    "this is not a rank1-style model")
    return ids[0][0], ids[1][0]


class Step(Enum):
    """What a backend does after :meth:`ReasoningChain.advance`."""

    CONTINUE = "continue"  # feed the token and generate the next one
    ANSWER = "answer"  # the reasoning closed: feed the token; the answer distribution is at the next position
    FORCE = "force"  # the reasoning did not close: score the fallback prompt (``chain.fallback_prompt``)
    RETHINK = "rethink"  # budget forcing: continue from ``prompt + chain.text`` (``</think>`` became ``\nWait``)


@dataclass
class ReasoningChain:
    """The reasoning of one pair as it is generated, and the rules that end it.

    Text is kept as bytes, so a multi-byte character split over tokens never breaks ``</think>`` detection.
    """

    prompt: str
    budget: int
    rethinks_left: int = 0
    text: bytearray = field(default_factory=bytearray)
    n_tokens: int = 0
    forced: bool = False

    def advance(self, token: int, piece: bytes, end_of_generation: bool) -> Step:
        """Account for one greedily chosen token (``piece`` is its text) and say what comes next."""
        if end_of_generation:
            self.forced = True
            return Step.FORCE
        self.n_tokens += 1
        self.text += piece
        close = self.text.find(THINK_CLOSE_BYTES)
        if close >= 0 and self.rethinks_left > 0:
            self.rethinks_left -= 1
            del self.text[close:]
            self.text += RETHINK_SUFFIX.encode()
            return Step.RETHINK
        if close >= 0:
            return Step.ANSWER
        if self.n_tokens >= self.budget:
            self.forced = True
            return Step.FORCE
        return Step.CONTINUE

    @property
    def decoded(self) -> str:
        return self.text.decode("utf-8", "replace")

    @property
    def reasoning(self) -> str:
        """The text before ``</think>`` (all of it when the reasoning never closed)."""
        close = self.text.find(THINK_CLOSE_BYTES)
        return (self.text[:close] if close >= 0 else self.text).decode("utf-8", "replace")

    @property
    def continuation_prompt(self) -> str:
        """Prompt plus the reasoning so far (after a rethink: ending in ``\\nWait``)."""
        return self.prompt + self.decoded

    @property
    def fallback_prompt(self) -> str:
        return fallback_prompt(self.prompt, self.decoded)
