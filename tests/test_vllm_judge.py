"""vLLM — the official engine — as the judge of the official protocol (runs in the vLLM virtualenv that `.ci/run`
builds: ``python -m pytest -q -m vllm tests``).

On the behaving fixture (and two checkpoints derived from it that provoke rare cases on purpose), the llama.cpp
runtime (F32 GGUF) and the transformers backend are compared with the vLLM runner in float32 and in float16 (the
official dtype).

The bar, per pair:
- **Exact, always**: the same reasoning text, token count, forced flag (main path or fallback), too-long flag and
  decision (score above 0.5 or not).
- **float32 against float32**: |Δscore| ≤ 1e-3.
- **float16 against float16 (and llama.cpp, which computes in float32, against float16 vLLM)**: one criterion for
  every such comparison, the triangle inequality over the float32 agreement: |A16 − B16| ≤ |A16 − A32| + |B16 − B32|
  + 1e-3, where X16 − X32 is engine X's own float16 rounding on that pair (0 for an engine that computes in float32).
  A score near 0.5 moves most with the logits (dp = p(1−p)·d(log-odds)), and this bound grows with it. Each engine's
  own float16 rounding is itself bounded, in log-odds: |logit(X16) − logit(X32)| ≤ 0.1 (float16 keeps 11 bits, so
  the true-false logit gap of this fixture, at most ~20, carries rounding of order 0.01; 0.1 leaves a 10x margin and
  still catches a broken float16 path).
- **A greedy token flipped by float16**: when an engine's float16 run leaves its own float32 path on a pair (other
  reasoning), that is float16 rounding, not a bug, if both engines agree in float32 on that pair (checked above): the
  pair's float16 scores are then not compared. If neither engine's float16 path left its float32 path, the paths
  must be the same, so a real difference between the engines can never hide there. At most a quarter of a case's
  pairs may flip.
"""

from __future__ import annotations

import logging
import math

import pytest
from derived_models import answers_muted, derive, ends_early, overconfident

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
            "ends-early": derive(source, root / "ends-early", ends_early),
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


F32_TOLERANCE = 1e-3
F16_LOG_ODDS = 0.1  # an engine's own float16 rounding of the true-false log-odds (see the module docstring)


def path(r) -> tuple:
    """What must be exactly equal between two engines: the reasoning, its length, the path taken and the decision."""
    return r.reasoning, r.n_tokens, r.forced, r.too_long, r.score > 0.5


def log_odds(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def compare(got, want, tolerance=F32_TOLERANCE) -> float:
    """Assert the float32 bar; the largest |Δscore| (logged, for the record)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.reasoning == w.reasoning, (g.reasoning, w.reasoning)
        assert g.forced == w.forced and g.too_long == w.too_long and g.n_tokens == w.n_tokens
        assert (g.score > 0.5) == (w.score > 0.5)
        assert abs(g.score - w.score) <= tolerance, (g.score, w.score)
    return max(abs(g.score - w.score) for g, w in zip(got, want, strict=True))


def own_rounding(x16, x32) -> float:
    """An engine's own float16 rounding on one pair (0 where float16 changed its path: nothing to compare)."""
    if path(x16)[:4] != path(x32)[:4]:
        return 0.0
    assert abs(log_odds(x16.score) - log_odds(x32.score)) <= F16_LOG_ODDS, (x16.score, x32.score)
    return abs(x16.score - x32.score)


def compare_f16(a16, a32, b16, b32) -> float:
    """Two engines in float16 (an engine computing in float32 passes its one run as both), under the one float16
    criterion of the module docstring; the float32 runs must already have passed :func:`compare`. Returns the largest
    |Δscore| on the pairs compared."""
    largest, flipped = 0.0, 0
    for a, a_, b, b_ in zip(a16, a32, b16, b32, strict=True):
        if path(a)[:4] != path(a_)[:4] or path(b)[:4] != path(b_)[:4]:
            flipped += 1  # float16 left an engine's own float32 path, where both engines agree (float32 checked)
            continue
        assert path(a) == path(b), (path(a), path(b))
        bound = own_rounding(a, a_) + own_rounding(b, b_) + F32_TOLERANCE
        assert abs(a.score - b.score) <= bound, (a.score, b.score, bound)
        largest = max(largest, abs(a.score - b.score))
    assert flipped <= len(a16) // 4, f"float16 changed the greedy path of {flipped} of {len(a16)} pairs"
    return largest


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
    "generation ends at end of sequence": ("ends-early", 64, PAIRS, lambda rs: any(r.forced and r.n_tokens < 64
                                                                                  for r in rs)),
    "prompt longer than the context": ("behaving", 64, [LONG, PAIRS[0]], lambda rs: rs[0].too_long and
                                       rs[0].score == 0.5 and not rs[1].too_long),
    "rank1's tokenizer (<think> tokens)": ("behaving-think", 64, PAIRS, lambda rs: all(not r.forced or r.n_tokens < 64
                                                                                     for r in rs)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_and_transformers_agree_with_vllm(case, checkpoints, ggufs):
    name, budget, pairs, holds = CASES[case]
    config = ScoringConfig(max_think_tokens=budget, n_ctx=N_CTX)
    vllm32 = judge(checkpoints, name, "float32").score_pairs(pairs, config=config)
    vllm16 = judge(checkpoints, name, "float16").score_pairs(pairs, config=config)
    assert holds(vllm32) and holds(vllm16), [(r.reasoning, r.forced, r.n_tokens) for r in vllm32]
    with Rank1(ggufs[name], config, parallel=4, threads=2, f32_kv_cache=True) as model:
        llama = model.score_pairs(pairs)
    deltas = {"llama.cpp vs vLLM fp32": compare(llama, vllm32),
              "llama.cpp vs vLLM fp16": compare_f16(llama, llama, vllm16, vllm32)}
    hf = {}
    for dtype in ("float32", "float16"):
        with TransformersRank1(checkpoints[name], config, device="cpu", dtype=dtype) as model:
            hf[dtype] = model.score_pairs(pairs)
    deltas["transformers fp32 vs vLLM fp32"] = compare(hf["float32"], vllm32)
    deltas["transformers fp16 vs vLLM fp16"] = compare_f16(hf["float16"], hf["float32"], vllm16, vllm32)
    logger.info("%s: paths %s; max |Δscore| %s", case, sorted({(r.forced, r.too_long) for r in vllm32}),
                {k: f"{v:.1e}" for k, v in deltas.items()})


def test_vllm_ranks_as_the_runtime(checkpoints, ggufs):
    """A ranking through vLLM itself (``rerank``) is the llama.cpp runtime's ranking."""
    query = make_pair("apple", "apple").query
    docs = [make_pair("apple", w).passage for w in ("horse", "apple", "cherry", "lemon")]
    ranked = judge(checkpoints, "behaving", "float32").rerank(query, docs)
    config = ScoringConfig(max_think_tokens=64, n_ctx=N_CTX)
    with Rank1(ggufs["behaving"], config, parallel=4, threads=2, f32_kv_cache=True) as model:
        local = model.rerank(query, docs)
    assert [r.index for r in ranked] == [r.index for r in local]
    assert [r.relevant for r in ranked] == [r.relevant for r in local]


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
    want = [r.score for r in judge(checkpoints, "behaving", "float16").score_pairs(PAIRS, config=config)]
    assert sum((g > 0.5) == (w > 0.5) for g, w in zip(got, want, strict=True)) / len(PAIRS) >= 0.9
    assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 0.1
