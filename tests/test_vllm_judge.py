"""vLLM — the official engine — as the judge of the official protocol (runs in the vLLM virtualenv that `.ci/run`
builds: ``python -m pytest -q -m vllm tests``).

On the behaving fixture (and two checkpoints derived from it that provoke rare cases on purpose), the llama.cpp
runtime (F32 GGUF) and the transformers backend are compared with the vLLM runner in float32 and in float16 (the
official dtype). The bar for every case: the same decision, |Δscore| ≤ 1e-3, identical reasoning text, the same
path (main or fallback).
"""

from __future__ import annotations

import logging

import pytest
from derived_models import answers_muted, derive, overconfident

from quantize.fixtures.synthetic_task import eval_pairs, make_pair
from rank1_local import Rank1, ScoringConfig
from rank1_local.backends.hf import TransformersRank1

pytestmark = pytest.mark.vllm
logger = logging.getLogger(__name__)
vllm = pytest.importorskip("vllm")
from rank1_local.backends.vllm import VllmRank1  # noqa: E402

N_CTX = 512
PAIRS = [(p.query, p.passage) for p in eval_pairs()[:12]]
LONG = (PAIRS[0][0], PAIRS[0][1] + " " + " ".join(["filler words keep coming"] * 150))


@pytest.fixture(scope="module")
def checkpoints(fixture_dir, tmp_path_factory):
    source = fixture_dir("behaving")
    root = tmp_path_factory.mktemp("derived")
    return {"behaving": source, "overconfident": derive(source, root / "overconfident", overconfident),
            "answers-muted": derive(source, root / "answers-muted", answers_muted),
            "behaving-think": fixture_dir("behaving-think")}


@pytest.fixture(scope="module")
def ggufs(checkpoints, tmp_path_factory):
    from quantize.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {name: export_gguf(path, out / name, "F32", progress=False)[0].path for name, path in checkpoints.items()}


_judges: dict = {}


def judge(checkpoints, name: str, dtype: str) -> VllmRank1:
    """One vLLM engine per (checkpoint, dtype), loaded once for the module."""
    if (name, dtype) not in _judges:
        _judges[(name, dtype)] = VllmRank1(checkpoints[name], ScoringConfig(max_think_tokens=64, n_ctx=N_CTX),
                                           dtype=dtype, cpu_kv_cache_gib=1)
    return _judges[(name, dtype)]


def compare(got, want, tolerance=1e-3) -> float:
    """Assert the bar; the largest |Δscore| (logged, for the record)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.reasoning == w.reasoning, (g.reasoning, w.reasoning)
        assert g.forced == w.forced and g.too_long == w.too_long and g.n_tokens == w.n_tokens
        assert (g.score > 0.5) == (w.score > 0.5)
        assert abs(g.score - w.score) <= tolerance, (g.score, w.score)
    return max(abs(g.score - w.score) for g, w in zip(got, want, strict=True))


def compare_with_fp16(got, vllm16, vllm32):
    """llama.cpp computes in float32 whatever the weights: against float16 vLLM it must be as close as float32 vLLM
    is (plus 1e-3), on the same path wherever vLLM takes the same path in both dtypes."""
    for g, h, f in zip(got, vllm16, vllm32, strict=True):
        if (h.reasoning, h.forced, h.n_tokens) != (f.reasoning, f.forced, f.n_tokens):
            compare([g], [f])  # float16 rounding changed vLLM's own greedy path: follow its float32 run
            continue
        compare([g], [h], tolerance=abs(h.score - f.score) + 1e-3)


CASES = {
    # name: (checkpoint, budget, pairs, what must be true of the vLLM results)
    "closes normally": ("behaving", 64, PAIRS, lambda rs: all(not r.too_long and "</think>" not in r.reasoning
                                                               and r.n_tokens < 64 for r in rs)),
    "forced, cut mid-sentence": ("behaving", 12, PAIRS[:6], lambda rs: all(r.forced and "." in r.reasoning
                                                                          for r in rs)),
    "forced, no sentence end": ("behaving", 4, PAIRS[:6], lambda rs: all(r.forced and not any(c in r.reasoning
                                                                                             for c in ".!?")
                                                                        for r in rs)),
    "answer outside the top 20": ("overconfident", 64, PAIRS, lambda rs: any(r.forced for r in rs)),
    "</think> not followed by an answer": ("answers-muted", 48, PAIRS[:6],
                                           lambda rs: any(r.n_tokens == 48 or r.forced for r in rs)),
    "prompt longer than the context": ("behaving", 64, [LONG, PAIRS[0]], lambda rs: rs[0].too_long and
                                       rs[0].score == 0.5 and not rs[1].too_long),
    "rank1's tokenizer (<think> tokens)": ("behaving-think", 64, PAIRS, lambda rs: all(not r.forced or r.n_tokens < 64
                                                                                     for r in rs)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_and_transformers_agree_with_vllm(case, checkpoints, ggufs):
    name, budget, pairs, holds = CASES[case]
    config = ScoringConfig(max_think_tokens=budget, n_ctx=N_CTX)
    vllm32 = judge(checkpoints, name, "float32").with_config(config).score_pairs(pairs)
    vllm16 = judge(checkpoints, name, "float16").with_config(config).score_pairs(pairs)
    assert holds(vllm32) and holds(vllm16), [(r.reasoning, r.forced, r.n_tokens) for r in vllm32]
    with Rank1(ggufs[name], config, parallel=4, threads=2, f32_kv_cache=True) as model:
        llama = model.score_pairs(pairs)
    deltas = {"llama.cpp vs vLLM fp32": compare(llama, vllm32),
              "llama.cpp vs vLLM fp16": max(abs(a.score - b.score) for a, b in zip(llama, vllm16, strict=True))}
    compare_with_fp16(llama, vllm16, vllm32)
    for dtype, reference in (("float32", vllm32), ("float16", vllm16)):
        with TransformersRank1(checkpoints[name], config, device="cpu", dtype=dtype) as model:
            deltas[f"transformers {dtype} vs vLLM {dtype}"] = compare(model.score_pairs(pairs), reference)
    logger.info("%s: paths %s; max |Δscore| %s", case, sorted({(r.forced, r.too_long) for r in vllm32}),
                {k: f"{v:.1e}" for k, v in deltas.items()})


def test_vllm_scores_as_the_official_code(checkpoints):
    """A ranking through vLLM itself: the relevant passage first."""
    query = make_pair("apple", "apple").query
    docs = [make_pair("apple", w).passage for w in ("horse", "apple", "cherry")]
    ranked = judge(checkpoints, "behaving", "float32").rerank(query, docs)
    assert ranked[0].index == 1 and ranked[0].relevant and not ranked[-1].relevant


SCORE_IN_VLLM = """
import json, sys
from rank1_local import ScoringConfig
from rank1_local.backends.vllm import VllmRank1
pairs = json.loads(sys.argv[2])
model = VllmRank1(sys.argv[1], ScoringConfig(max_think_tokens=64, n_ctx=512), dtype="float16", cpu_kv_cache_gib=1)
print(json.dumps([r.score for r in model.score_pairs(pairs)]))
"""


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_exports_load_and_score_in_vllm(method, checkpoints):
    """The 4-bit exports of ``rank1-quantize gptq|awq`` (made by the main suite, which has GPTQModel) run in vLLM's
    CPU build in float16 and rank like the unquantized model. Each runs in a process of its own: vLLM's in-process
    engine cannot load a quantized model beside the engines this module keeps."""
    import json
    import subprocess
    import sys

    from conftest import weight_quant_cache

    folder = weight_quant_cache(checkpoints["behaving"]) / method
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder}: made by tests/test_weight_quant.py in the main virtualenv (run it first)")
    out = subprocess.run([sys.executable, "-c", SCORE_IN_VLLM, str(folder), json.dumps(PAIRS)], check=True,
                         capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    config = ScoringConfig(max_think_tokens=64, n_ctx=N_CTX)
    want = [r.score for r in judge(checkpoints, "behaving", "float16").with_config(config).score_pairs(PAIRS)]
    assert sum((g > 0.5) == (w > 0.5) for g, w in zip(got, want, strict=True)) / len(PAIRS) >= 0.9
    assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 0.1
