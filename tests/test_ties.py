"""Ties in the top 1 go to the lowest token id, as torch's and vLLM's argmax give them.

On the tied-top checkpoint (``tests/derived_models.py``: the row of " wants" is a copy of the row of " asks") the two
tokens' logits are bit-identical wherever the behaving fixture writes " asks" ("The query asks about …", once in every
chain). Each test first checks that the tie is there, in the backend's own logits at that position, so it cannot pass
for want of a tie; then that the backend writes " wants", the lower id. llama.cpp: the host rows (full logits) and the
device rows (the top-20 sampler chain in llama.cpp's graph, whose candidates list " asks" first) on F32 and Q8_0
exports; transformers: float32 and float16. vLLM is checked in the vLLM tier (``tests/test_vllm_judge.py``).
"""

from __future__ import annotations

import pytest
from derived_models import TIED_HIGH, TIED_LOW, derive, tied_top

from quantize.fixtures.synthetic_task import eval_pairs
from rank1_local import Rank1, ScoringConfig

PAIRS = [(p.query, p.passage) for p in eval_pairs()[:4]]
# the prompt of PAIRS[0] and its chain up to the tied position
PREFIX = ("Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
          f"Query: {PAIRS[0][0]}\nPassage: {PAIRS[0][1]}\n<think>\nThe query")
CONFIG = ScoringConfig(max_think_tokens=64, n_ctx=512)


@pytest.fixture(scope="module")
def tied(fixture_dir, tmp_path_factory):
    return derive(fixture_dir("behaving"), tmp_path_factory.mktemp("derived") / "tied-top", tied_top)


@pytest.fixture(scope="module")
def tied_gguf(tied, tmp_path_factory):
    from quantize.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("tied-gguf")
    return lambda gguf_type: export_gguf(tied, out, gguf_type, progress=False, allow_no_imatrix=True)[0].path


def assert_lowest_id_written(results) -> None:
    for r in results:
        assert r.reasoning.startswith("\nThe query wants about"), r.reasoning
        assert " asks" not in r.reasoning


@pytest.mark.parametrize("sampling", ["host", "device"])
@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0"])
def test_llama_cpp_breaks_a_top_1_tie_to_the_lowest_id(tied_gguf, gguf_type, sampling):
    from rank1_local.backends.llama.engine import BatchEntry, EngineConfig, LlamaEngine

    path = tied_gguf(gguf_type)
    engine = LlamaEngine(path, EngineConfig(kv_cells=1024, n_seq_max=2, n_threads=2, sampling=sampling))
    try:
        ids = engine.tokenize(PREFIX)
        row = engine.decode([BatchEntry(t, i, 1, i == len(ids) - 1) for i, t in enumerate(ids)])[len(ids) - 1]
        if sampling == "host":
            values = row.values
            assert values[TIED_LOW] == values[TIED_HIGH] == values.max()
        else:
            assert engine.sampling == "device", "this llama.cpp build did not run the sampler chain in its graph"
            candidates = row.candidates
            assert candidates[TIED_LOW] == candidates[TIED_HIGH] == max(candidates.values())
        assert row.best() == TIED_LOW
    finally:
        engine.close()
    with Rank1(path, CONFIG, parallel=2, threads=2, sampling=sampling) as model:
        assert_lowest_id_written(model.score_pairs(PAIRS))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_transformers_breaks_a_top_1_tie_to_the_lowest_id(tied, dtype):
    import torch
    import transformers

    from rank1_local.backends.hf import TransformersRank1

    tokenizer = transformers.AutoTokenizer.from_pretrained(tied)
    model = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        row = model(tokenizer(PREFIX, return_tensors="pt").input_ids).logits[0, -1]
    assert row[TIED_LOW] == row[TIED_HIGH] == row.max()
    del model
    with TransformersRank1(tied, CONFIG, device="cpu", dtype=dtype) as backend:
        assert_lowest_id_written(backend.score_pairs(PAIRS))
