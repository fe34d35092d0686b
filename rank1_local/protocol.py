"""The rank1 scoring rules as pure functions (see RANK1.md), shared by every engine."""

from __future__ import annotations

import math
from collections.abc import Callable

from rank1_local.errors import UnsupportedModelError

THINK_CLOSE_BYTES = b"</think>"
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
    return prompt + "\n" + cut_to_sentence(generated_text) + "\n</think>"


def common_prefix_len(a: list[int], b: list[int]) -> int:
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
