"""vLLM's own Qwen3-Reranker path as a judge of the qwen3-reranker card (runs in the vLLM virtualenv:
``python -m pytest -q -m vllm tests/test_vllm_qwen3_reranker.py``).

vLLM serves the original Qwen3-Reranker through the override its documentation and its offline example give: the
checkpoint loaded as ``Qwen3ForSequenceClassification`` on the pooling runner, its classifier made from the lm_head
rows of "no" and "yes" (``is_original_qwen3_reranker``), and ``LLM.score`` given the card's prompt in two halves
(system, instruction and query; then document and suffix). Float32, on the qwen3-reranker-behaving fixture, it is
compared with the independent re-typing of the official card's code (tests/qwen3_reranker_reference.py) and with
our llama.cpp runtime on our F32 export: every score within 1e-3, each query's passages in the same order.
"""

from __future__ import annotations

import gc

import pytest

from quantize.fixtures.synthetic_task import eval_pairs

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qwen3_reranker_reference import (  # noqa: E402  (after the importorskip of torch/transformers)
    PREFIX,
    SUFFIX,
    Qwen3RerankerReference,
    format_instruction,
)

pytestmark = pytest.mark.vllm

FIXTURE = "qwen3-reranker-behaving"
TOLERANCE = 1e-3
OTHER_INSTRUCTION = "Given a question about a topic, find the passages about that same topic"
INSTRUCTIONS = [None, OTHER_INSTRUCTION]
OVERRIDES = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
             "is_original_qwen3_reranker": True}


@pytest.fixture(scope="module")
def pairs():
    return eval_pairs()


@pytest.fixture(scope="module")
def vllm_scores(fixture_dir, pairs):
    """instruction -> vLLM's score of every pair, and the prompt ids vLLM ran (one engine for both instructions)."""
    vllm = pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    memory = {"kv_cache_memory_bytes": 256 << 20} if current_platform.is_cpu() else {}
    llm = vllm.LLM(model=str(fixture_dir(FIXTURE)), runner="pooling", dtype="float32", max_model_len=512,
                   hf_overrides=OVERRIDES, **memory)
    try:
        out = {}
        for instruction in INSTRUCTIONS:
            # the card's formatted pair, cut where vLLM's example cuts it: after the query's line
            halves = [(PREFIX + format_instruction(instruction, p.query, p.passage)).split("<Document>: ")
                      for p in pairs]
            queries = [head for head, _ in halves]
            documents = [f"<Document>: {doc}{SUFFIX}" for _, doc in halves]
            results = llm.score(queries, documents, use_tqdm=False)
            out[instruction] = ([r.outputs.score for r in results], [list(r.prompt_token_ids) for r in results])
        return out
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return Qwen3RerankerReference(fixture_dir(FIXTURE))


def _assert_alike(got, want, pairs):
    """Every score within 1e-3, and each query's passages in the same order."""
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOLERANCE
    for query in {p.query for p in pairs}:
        rows = [i for i, p in enumerate(pairs) if p.query == query]
        assert sorted(rows, key=lambda i: -got[i]) == sorted(rows, key=lambda i: -want[i]), query


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=["default-instruction", "other-instruction"])
def test_vllm_runs_the_cards_prompt_and_scores_like_the_reference(instruction, vllm_scores, reference, pairs):
    """vLLM ran the very token ids the card's code builds, and its scores are the card's within 1e-3."""
    scores, prompt_ids = vllm_scores[instruction]
    assert prompt_ids == [reference.input_ids(p.query, p.passage, instruction) for p in pairs]
    _assert_alike(scores, reference.scores([(p.query, p.passage) for p in pairs], instruction), pairs)


@pytest.mark.parametrize("instruction", INSTRUCTIONS, ids=["default-instruction", "other-instruction"])
def test_our_llama_cpp_runtime_scores_like_vllm(instruction, vllm_scores, exported, pairs):
    """Our runtime on our F32 GGUF (the card recognised from the file) within 1e-3 of vLLM, the same order."""
    from rank1_local import open_reranker
    from rank1_local.core.cards import QWEN3_RERANKER

    items = [(p.query, p.passage) if instruction is None else (p.query, p.passage, instruction) for p in pairs]
    with open_reranker("llama.cpp", exported(FIXTURE, "F32"), threads=2, parallel=4) as reranker:
        assert reranker.card is QWEN3_RERANKER
        got = [r.score for r in reranker.score_pairs(items)]
    _assert_alike(got, vllm_scores[instruction][0], pairs)
