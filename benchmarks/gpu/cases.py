"""The budget cases of ``tests/test_vllm_judge.py`` (the official protocol's rare paths), for the GPU check.

The same names, checkpoints, budgets and pairs as the test's ``CASES`` (``tests/test_gpu_check.py`` checks that the
two stay in step); what the test asserts of vLLM's results is not repeated here: the GPU check compares engines.
"""

from __future__ import annotations

from quantize.fixtures.synthetic_task import eval_pairs

N_CTX = 512  # the tests' context
PARALLEL = 4


def _pairs() -> list[tuple[str, str]]:
    return [(p.query, p.passage) for p in eval_pairs()[:12]]


def cases() -> dict[str, tuple[str, int, list[tuple[str, str]]]]:
    """name -> (checkpoint, budget, pairs)"""
    pairs = _pairs()
    long = (pairs[0][0], pairs[0][1] + " " + " ".join(["filler words keep coming"] * 150))
    return {
        "closes normally": ("behaving", 64, pairs),
        "forced, cut mid-sentence": ("behaving", 12, pairs[:6]),
        "forced, no sentence end": ("behaving", 4, pairs[:6]),
        "prompt longer than the context": ("behaving", 64, [long, pairs[0]]),
        "answer outside the top 20": ("overconfident", 64, pairs),
        "</think> not followed by an answer": ("answers-muted", 48, pairs[:6]),
        "generation ends at end of sequence": ("ends-early", 64, pairs),
        "rank1's tokenizer (<think> tokens)": ("behaving-think", 64, pairs),
    }
