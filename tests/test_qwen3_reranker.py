"""The qwen3-reranker-behaving fixture, judged by an independent re-typing of the official model card's code
(tests/qwen3_reranker_reference.py), and its GGUF exports run by llama.cpp: ours and llama.cpp's own converter's,
read directly (the last position's "yes"/"no" logits) and through ``llama-server --reranking`` (the rerank head).

Scores are P("yes") / (P("yes") + P("no")) at the last prompt position, compared in float32 within 1e-3.
"""

from __future__ import annotations

import math

import pytest

from quantize.fixtures.synthetic_task import eval_pairs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen3_reranker_reference import (  # noqa: E402  (after the importorskip of torch/transformers)
    PREFIX,
    SUFFIX,
    Qwen3RerankerReference,
    format_instruction,
)

FIXTURE = "qwen3-reranker-behaving"
YES, NO = 9693, 2152  # the Qwen2/Qwen3 vocabulary's "yes" and "no"
TOLERANCE = 1e-3
OTHER_INSTRUCTION = "Given a question about a topic, find the passages about that same topic"  # trained as well


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return Qwen3RerankerReference(fixture_dir(FIXTURE))


@pytest.fixture(scope="module")
def pairs():
    return eval_pairs()


@pytest.fixture(scope="module")
def reference_scores(reference, pairs):
    """instruction (None: the card's default) -> the reference's score of every evaluation pair."""
    return {instruction: reference.scores([(p.query, p.passage) for p in pairs], instruction)
            for instruction in (None, OTHER_INSTRUCTION)}


def test_the_reference_reads_the_card_as_written(reference):
    assert (reference.token_true_id, reference.token_false_id) == (YES, NO)
    ids = reference.input_ids("What is known about the apple?", "This passage describes the apple in some detail.")
    text = reference.tokenizer.decode(ids)
    assert text == PREFIX + format_instruction(None, "What is known about the apple?",
                                               "This passage describes the apple in some detail.") + SUFFIX
    assert ids[-4:] == [151667, 271, 151668, 271]  # "<think>", "\n\n", "</think>", "\n\n"


@pytest.mark.parametrize("instruction", [None, OTHER_INSTRUCTION], ids=["default-instruction", "other-instruction"])
def test_the_fixture_scores_as_trained(pairs, reference_scores, instruction):
    """Clear yes for the same topic, clear no for another category, unsure (both sides of 0.5) within a category."""
    scores = reference_scores[instruction]
    by_kind: dict[str, list[float]] = {"same": [], "related": [], "different": []}
    for pair, score in zip(pairs, scores, strict=True):
        by_kind[pair.kind].append(score)
        if pair.kind == "related":
            assert abs(score - pair.target) < 0.2, (pair.query_word, pair.passage_word, score)
    assert min(by_kind["same"]) > 0.9
    assert max(by_kind["different"]) < 0.1
    assert 0.15 < min(by_kind["related"]) < 0.5 < max(by_kind["related"]) < 0.85


def _llama_cpp_scores(gguf, reference, pairs, instruction):
    """Each pair's prompt tokenized by llama.cpp (as llama-server does: one string, special tokens parsed), checked
    against the card's ids, evaluated, and scored from the last position's logits."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    scores = []
    try:
        for pair in pairs:
            text = PREFIX + format_instruction(instruction, pair.query, pair.passage) + SUFFIX
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ids == reference.input_ids(pair.query, pair.passage, instruction)
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            scores.append(1.0 / (1.0 + math.exp(logits[NO] - logits[YES])))
    finally:
        llm.close()
    return scores


@pytest.fixture(scope="module")
def llama_cpp_gguf(fixture_dir, exported, converted_by_llama_cpp):
    return {"ours": lambda: exported(FIXTURE, "F32"),
            "llama.cpp's converter": lambda: converted_by_llama_cpp(fixture_dir(FIXTURE), "f32")}


@pytest.mark.parametrize("source", ["ours", "llama.cpp's converter"])
@pytest.mark.parametrize("instruction", [None, OTHER_INSTRUCTION], ids=["default-instruction", "other-instruction"])
def test_llama_cpp_matches_the_reference(source, instruction, llama_cpp_gguf, reference, pairs, reference_scores):
    """The F32 GGUF, in llama.cpp, scores every pair within 1e-3 of the card's code, and ranks each query's passages
    the same."""
    got = _llama_cpp_scores(llama_cpp_gguf[source](), reference, pairs, instruction)
    want = reference_scores[instruction]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOLERANCE
    for query in {p.query for p in pairs}:
        rows = [i for i, p in enumerate(pairs) if p.query == query]
        assert sorted(rows, key=lambda i: -got[i]) == sorted(rows, key=lambda i: -want[i])


@pytest.mark.parametrize("source", ["ours", "llama.cpp's converter"])
def test_llama_server_reranks_like_the_reference(source, llama_cpp_gguf, pairs, reference_scores):
    """``llama-server --reranking`` (built from the same llama.cpp: python -m benchmarks.llama_server build) serves the
    GGUF's rerank head: its /v1/rerank scores equal the card's within 1e-3 (llama-server's prompt holds the card's
    default instruction)."""
    from benchmarks.llama_server import LlamaServer, built_server

    if built_server() is None:
        pytest.skip("llama-server is not built here: python -m benchmarks.llama_server build (compiles llama.cpp)")
    want = reference_scores[None]
    with LlamaServer(llama_cpp_gguf[source]()) as server:
        for query in sorted({p.query for p in pairs}):
            rows = [i for i, p in enumerate(pairs) if p.query == query]
            got = server.rerank(query, [pairs[i].passage for i in rows])
            assert max(abs(g - want[i]) for g, i in zip(got, rows, strict=True)) <= TOLERANCE, (query, got)
