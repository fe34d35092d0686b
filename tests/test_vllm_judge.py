"""vLLM — the official engine — running the official code's logic, as the judge of every backend (runs in the vLLM
virtualenv that `.ci/run` builds: ``python -m pytest -q -m vllm --require vllm tests``).

The judge is :mod:`official_judge`: the official ``rank1.py`` flow re-typed on vLLM alone, sharing no code with
rank1_local. On the behaving fixture (and checkpoints derived from it that provoke the rare paths on purpose) it is
run in float32 and in float16 (the official dtype), and judges the project's vLLM backend (``VllmRank1``, in both
dtypes), the llama.cpp runtime (F32 GGUF, which computes in float32 whatever the weights: judged in float32) and the
transformers backend (both dtypes).

The bar, per pair:
- **Exact, always**: the same reasoning text, token count, forced flag (main path or fallback), too-long flag and
  decision (score above 0.5 or not): :func:`path`.
- **Against the judge in the same dtype on the same engine** (``VllmRank1``, float32 and float16) and **float32
  against float32** (llama.cpp, transformers): |Δscore| ≤ 1e-3.
- **transformers float16 against the judge in float16**: :func:`compare_f16` (its docstring says the rule and why).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import required, weight_quant_cache
from derived_models import TIED_HIGH, TIED_LOW, answers_muted, derive, ends_early, overconfident, tied_top
from official_judge import OfficialJudge, official_prompt

from quantize.fixtures.synthetic_task import eval_pairs, make_pair
from rank1_local import Rank1, ScoringConfig
from rank1_local.backends.hf import TransformersRank1
from rank1_local.backends.vllm import VllmRank1

pytestmark = pytest.mark.vllm
logger = logging.getLogger(__name__)

N_CTX = 512
PAIRS = [(p.query, p.passage) for p in eval_pairs()[:12]]
LONG = (PAIRS[0][0], PAIRS[0][1] + " " + " ".join(["filler words keep coming"] * 150))
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def checkpoints(fixture_dir, tmp_path_factory):
    source = fixture_dir("behaving")
    root = tmp_path_factory.mktemp("derived")
    return {"behaving": source, "overconfident": derive(source, root / "overconfident", overconfident),
            "answers-muted": derive(source, root / "answers-muted", answers_muted),
            "ends-early": derive(source, root / "ends-early", ends_early),
            "tied-top": derive(source, root / "tied-top", tied_top),
            "behaving-think": fixture_dir("behaving-think")}


@pytest.fixture(scope="module")
def ggufs(checkpoints, tmp_path_factory):
    from quantize.gguf_export import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {name: export_gguf(path, out / name, "F32", progress=False)[0].path for name, path in checkpoints.items()}


class Engines:
    """The vLLM engines of one checkpoint at a time (the judge and ``VllmRank1``, each in float32 and float16): the
    engines of the checkpoint used before are freed when another one is asked for, so that at most four are held."""

    def __init__(self) -> None:
        self.checkpoint: str | None = None
        self.held: dict[tuple[str, str], object] = {}

    def _switch(self, checkpoint: str) -> None:
        if checkpoint != self.checkpoint:
            self.close()
            self.checkpoint = checkpoint

    def judge(self, checkpoints: dict, name: str, dtype: str) -> OfficialJudge:
        self._switch(name)
        if ("judge", dtype) not in self.held:
            self.held[("judge", dtype)] = OfficialJudge(checkpoints[name], dtype, context_size=N_CTX)
        return self.held[("judge", dtype)]  # type: ignore[return-value]

    def ours(self, checkpoints: dict, name: str, dtype: str) -> VllmRank1:
        self._switch(name)
        if ("ours", dtype) not in self.held:
            self.held[("ours", dtype)] = VllmRank1(checkpoints[name], ScoringConfig(max_think_tokens=64, n_ctx=N_CTX),
                                                   dtype=dtype, cpu_kv_cache_gib=1)
        return self.held[("ours", dtype)]  # type: ignore[return-value]

    def close(self) -> None:
        for held in self.held.values():
            held.close()  # type: ignore[attr-defined]
        self.held.clear()
        gc.collect()


@pytest.fixture(scope="module")
def engines():
    held = Engines()
    yield held
    held.close()


F32_TOLERANCE = 1e-3
F16_OWN_LOG_ODDS = 0.1  # a float16 engine's largest own rounding of the true-false log-odds (see compare_f16)
F16_FLOOR = 0.01  # compare_f16's floor, in log-odds


def path(r) -> tuple:
    """What must be exactly equal between two engines: the reasoning, its length, the path taken and the decision."""
    return r.reasoning, r.n_tokens, r.forced, r.too_long, r.score > 0.5


def log_odds(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def compare(label: str, got, want, tolerance=F32_TOLERANCE) -> float:
    """Assert the exact paths and |Δscore| ≤ ``tolerance`` on every pair of ``label`` (what is judged, against
    what); the largest |Δscore| (logged)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert path(g) == path(w), (f"{label}, pair {i}: another path", path(g), path(w))
        assert abs(g.score - w.score) <= tolerance, (f"{label}, pair {i}: |Δscore| over {tolerance}", g.score, w.score)
    return max(abs(g.score - w.score) for g, w in zip(got, want, strict=True))


def compare_f16(t16, t32, v16, v32) -> float:
    """transformers in float16 (``t16``) against the judge in float16 (``v16``), bounded by what vLLM's own float16
    does on the same pairs; ``t32`` and ``v32`` (their float32 runs) must already have passed :func:`compare`.

    The rule, per case (lo = log-odds of the score, log(p / (1 − p))):

    1. **Paths.** On every pair the float16 paths are equal, except where vLLM's own float16 left its float32 path
       (the judge's float16 and float32 runs differ there): float16 rounding decided a near-tie of greedy tokens, and
       transformers' float16 may fall either way. At most a quarter of a case's pairs may be excused.
    2. **Scores, compared directly**, over the pairs with equal paths:
       mean |lo(T16) − lo(V16)| ≤ 2 · mean |lo(V16) − lo(V32)| + mean |lo(T32) − lo(V32)| + 0.01.
       Why: lo(T16) − lo(V16) = [lo(T16) − lo(T32)] + [lo(T32) − lo(V32)] + [lo(V32) − lo(V16)]. The middle term is
       the float32 disagreement, measured. The last is vLLM's own float16 rounding, measured on the same pairs. The
       first is transformers' own float16 rounding, which a correct float16 path keeps to the size of vLLM's (the
       same weights rounded to the same 11 bits, summed in the same order of magnitude); the bound allows it as much
       as vLLM's again, in mean. Log-odds, not scores: a score near 0 or 1 barely moves while the logits do
       (dp = p(1 − p)·d lo), so the same rounding reads the same everywhere. The mean over a case, not the largest
       pair: a rounding tail on one pair is no bug, a shift on every pair is. The floor 0.01 is for a case whose
       float16 runs round to almost nothing (it is 1/5 of the smallest shift the mutation tests must catch: 0.05).
       Measured on vLLM's CPU build, per case: vLLM's own 0.0007–0.0073, transformers' own 0.0007–0.0080, the
       direct difference 0.0000–0.0153 against bounds of 0.0115–0.0245; our float16 path shifted by +0.05 in
       log-odds, or with its attention mask leaving the first token out, fails.
    3. **Sanity of the bound**: each float16 run's own rounding stays within 0.1 in log-odds on every pair with
       an unchanged path (the fixture's true-false logit gap is at most ~20; float16 keeps 11 bits: rounding of order
       0.01), so a broken vLLM float16 cannot loosen rule 2 without being seen.

    Returns the mean |lo(T16) − lo(V16)| (logged).
    """
    excused, same = 0, []
    for i, (t, t_, v, v_) in enumerate(zip(t16, t32, v16, v32, strict=True)):
        if path(v) != path(v_):
            excused += 1
            continue
        assert path(t) == path(v), (f"transformers float16 vs the judge in float16, pair {i}: another path where "
                                    "vLLM's float16 kept its float32 path", path(t), path(v))
        same.append((t, t_, v, v_))
    assert excused <= len(t16) // 4, f"vLLM's float16 changed the greedy path of {excused} of {len(t16)} pairs"
    if not same:
        return 0.0
    for t, t_, v, v_ in same:  # equal paths, all four (compare() has passed the float32 runs)
        assert abs(log_odds(t.score) - log_odds(t_.score)) <= F16_OWN_LOG_ODDS, (t.score, t_.score)
        assert abs(log_odds(v.score) - log_odds(v_.score)) <= F16_OWN_LOG_ODDS, (v.score, v_.score)

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    direct = mean(abs(log_odds(t.score) - log_odds(v.score)) for t, _, v, _ in same)
    vllm_own = mean(abs(log_odds(v.score) - log_odds(v_.score)) for _, _, v, v_ in same)
    f32 = mean(abs(log_odds(t_.score) - log_odds(v_.score)) for _, t_, _, v_ in same)
    bound = 2 * vllm_own + f32 + F16_FLOOR
    logger.info("float16, mean |Δlog-odds| over %d pairs (%d excused): transformers fp16 vs vLLM fp16 %.4f, vLLM's own "
                "%.4f, transformers' own %.4f, float32 %.4f; bound %.4f", len(same), excused, direct, vllm_own,
                mean(abs(log_odds(t.score) - log_odds(t_.score)) for t, t_, _, _ in same), f32, bound)
    assert direct <= bound, (f"mean |log-odds(transformers fp16) − log-odds(vLLM fp16)| = {direct:.4f} over "
                             f"{len(same)} pairs, above 2 × {vllm_own:.4f} (vLLM's own float16) + {f32:.4f} "
                             f"(float32) + {F16_FLOOR}")
    return direct


def by_score(judgments) -> list[int]:
    """Indices best first, as the official scores rank them (ties in input order)."""
    return sorted(range(len(judgments)), key=lambda i: -judgments[i].score)


def test_vllm_ranks_as_the_runtime(checkpoints, ggufs, engines):
    """A ranking through the project's vLLM backend (``rerank``) and through the llama.cpp runtime is the ranking of
    the official scores."""
    query = make_pair("apple", "apple").query
    docs = [make_pair("apple", w).passage for w in ("horse", "apple", "cherry", "lemon")]
    official = engines.judge(checkpoints, "behaving", "float32").judge([(query, d) for d in docs], 64)
    ranked = engines.ours(checkpoints, "behaving", "float32").rerank(query, docs)
    config = ScoringConfig(max_think_tokens=64, n_ctx=N_CTX)
    with Rank1(ggufs["behaving"], config, parallel=4, threads=2, f32_kv_cache=True) as model:
        local = model.rerank(query, docs)
    assert [r.index for r in ranked] == [r.index for r in local] == by_score(official)
    assert [r.relevant for r in ranked] == [r.relevant for r in local] == [official[i].score > 0.5
                                                                           for i in by_score(official)]


def edge_pairs(tokenizer) -> list[tuple[str, str]]:
    """Two pairs at the context's edge: a prompt of N_CTX − 10 tokens (the context runs out during the reasoning) and
    one of exactly N_CTX tokens (official prompt bytes, counted by the checkpoint's tokenizer)."""
    query, passage = PAIRS[0]
    out = []
    for target in (N_CTX - 10, N_CTX):
        text = passage
        while len(tokenizer(official_prompt(query, text)).input_ids) < target:
            text += " and"
        assert len(tokenizer(official_prompt(query, text)).input_ids) == target
        out.append((query, text))
    return out


def test_at_the_context_edge_every_backend_stops_where_the_official_pin_did(checkpoints, ggufs, engines):
    """vLLM 0.7.2, the official pin, ran a prompt of exactly n_ctx tokens and generated until the sequence was *longer*
    than n_ctx (see :mod:`official_judge`); so does every backend (``ScoringConfig.fits``, ``ReasoningChain``; our vLLM
    backend asks today's vLLM for one more token of context). A prompt of n_ctx − 10 tokens: forced after 11
    generated tokens, and scored 0.5 (the forced prompt does not fit). A prompt of n_ctx tokens: one token generated,
    its position scored (both answers are in its top 20 on this fixture: a score other than 0.5)."""
    judge = engines.judge(checkpoints, "behaving", "float32")
    pairs = edge_pairs(judge.tokenizer)
    official = judge.judge(pairs, 64)
    assert [(j.n_tokens, j.too_long) for j in official] == [(11, False), (1, False)]
    assert official[0].forced and official[0].score == 0.5 and official[1].score != 0.5
    config = ScoringConfig(max_think_tokens=64, n_ctx=N_CTX)
    with Rank1(ggufs["behaving"], config, parallel=2, threads=2, f32_kv_cache=True) as llama, \
            TransformersRank1(checkpoints["behaving"], config, dtype="float32") as hf:
        for name, model in (("vllm", engines.ours(checkpoints, "behaving", "float32")), ("llama.cpp", llama),
                            ("transformers", hf)):
            ours = model.score_pairs(pairs, config=config)
            assert [(r.n_tokens, r.forced, r.too_long, r.reasoning) for r in ours] == \
                [(j.n_tokens, j.forced, j.too_long, j.reasoning) for j in official], name
            assert all(abs(r.score - j.score) <= 1e-3 for r, j in zip(ours, official)), name


SCORE_IN_VLLM = """
import json, sys
from official_judge import OfficialJudge, official_prompt
pairs = json.loads(sys.argv[2])
judge = OfficialJudge(sys.argv[1], "float16", context_size=512)
print(json.dumps([j.score for j in judge.judge(pairs, 64)]))
"""


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_exports_load_and_score_in_vllm(method, checkpoints, engines, pytestconfig):
    """The 4-bit exports of ``rank1-quantize gptq|awq`` (made by the main suite, which has GPTQModel) run through the
    official code in vLLM's CPU build in float16 and rank like the unquantized model. Each runs in a process of its
    own: vLLM's in-process engine cannot load a quantized model beside the engines this module keeps."""
    folder = weight_quant_cache(checkpoints["behaving"]) / method
    if not (folder / "config.json").is_file():
        why = f"{folder}: made by tests/test_weight_quant.py in the main virtualenv (run it first)"
        if required(pytestconfig, "vllm"):
            pytest.fail(f"the vllm tier must run here, but there is no {method} export: {why}", pytrace=False)
        pytest.skip(why)
    out = subprocess.run([sys.executable, "-c", SCORE_IN_VLLM, str(folder), json.dumps(PAIRS)], check=True,
                         capture_output=True, text=True, cwd=TESTS)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = [j.score for j in engines.judge(checkpoints, "behaving", "float16").judge(PAIRS, 64)]
    assert sum((g > 0.5) == (w > 0.5) for g, w in zip(got, want, strict=True)) / len(PAIRS) >= 0.9
    assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 0.1


CASES = {
    # name: (checkpoint, budget, pairs, what must be true of the official results)
    "closes normally": ("behaving", 64, PAIRS, lambda rs: all(not r.too_long and "</think>" not in r.reasoning
                                                               and r.n_tokens < 64 for r in rs)),
    "forced, cut mid-sentence": ("behaving", 12, PAIRS[:6], lambda rs: all(r.forced and "." in r.reasoning
                                                                          for r in rs)),
    "forced, no sentence end": ("behaving", 4, PAIRS[:6], lambda rs: all(r.forced and not any(c in r.reasoning
                                                                                             for c in ".!?")
                                                                        for r in rs)),
    "prompt longer than the context": ("behaving", 64, [LONG, PAIRS[0]], lambda rs: rs[0].too_long and
                                       rs[0].score == 0.5 and not rs[1].too_long),
    "answer outside the top 20": ("overconfident", 64, PAIRS, lambda rs: any(r.forced for r in rs)),
    "</think> not followed by an answer": ("answers-muted", 48, PAIRS[:6],
                                           lambda rs: any(r.n_tokens == 48 or r.forced for r in rs)),
    "generation ends at end of sequence": ("ends-early", 64, PAIRS, lambda rs: any(r.forced and r.n_tokens < 64
                                                                                  for r in rs)),
    "rank1's tokenizer (<think> tokens)": ("behaving-think", 64, PAIRS, lambda rs: all(not r.forced or r.n_tokens < 64
                                                                                     for r in rs)),
    # " wants" and " asks" tie exactly in the top 1 (test_vllm_breaks_a_top_1_tie_to_the_lowest_id checks the tie)
    "a tie in the top 1 (the lowest id)": ("tied-top", 64, PAIRS[:6], lambda rs: all(
        r.reasoning.startswith("\nThe query wants about") for r in rs)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_agrees_with_the_official_code(case, checkpoints, ggufs, engines):
    name, budget, pairs, holds = CASES[case]
    config = ScoringConfig(max_think_tokens=budget, n_ctx=N_CTX)
    official = {dtype: engines.judge(checkpoints, name, dtype).judge(pairs, budget)
                for dtype in ("float32", "float16")}
    assert holds(official["float32"]) and holds(official["float16"]), \
        [(r.reasoning, r.forced, r.n_tokens) for r in official["float32"]]
    deltas = {}
    for dtype in ("float32", "float16"):
        ours = engines.ours(checkpoints, name, dtype).score_pairs(pairs, config=config)
        deltas[f"VllmRank1 {dtype}"] = compare(f"VllmRank1 {dtype} vs the judge", ours, official[dtype])
    for sampling in ("host", "device"):  # the greedy token and the top 20 from the full rows, or from llama.cpp's graph
        with Rank1(ggufs[name], config, parallel=4, threads=2, f32_kv_cache=True, sampling=sampling) as model:
            assert model._owner.sampling == sampling, "this llama.cpp build did not run the sampler chain in its graph"
            deltas[f"llama.cpp {sampling} (float32)"] = compare(f"llama.cpp, {sampling} sampling, vs the judge in "
                                                                "float32", model.score_pairs(pairs), official["float32"])
    hf = {}
    for dtype in ("float32", "float16"):
        with TransformersRank1(checkpoints[name], config, device="cpu", dtype=dtype) as model:
            hf[dtype] = model.score_pairs(pairs)
    deltas["transformers float32"] = compare("transformers float32 vs the judge", hf["float32"], official["float32"])
    deltas["transformers float16 (mean |Δlog-odds|)"] = compare_f16(hf["float16"], hf["float32"], official["float16"],
                                                                    official["float32"])
    logger.info("%s: paths %s; %s", case, sorted({(r.forced, r.too_long) for r in official["float32"]}),
                {k: f"{v:.1e}" for k, v in deltas.items()})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_vllm_breaks_a_top_1_tie_to_the_lowest_id(checkpoints, engines, dtype):
    """vLLM's greedy choice on the tied-top checkpoint (tests/derived_models.py): where " wants" and " asks" have the
    same log-probability (checked, so the test cannot pass for want of a tie), vLLM takes " wants", the lower id, as
    the other backends do (tests/test_ties.py)."""
    judge = engines.judge(checkpoints, "tied-top", dtype)
    params = judge.vllm.SamplingParams(temperature=0, max_tokens=8, logprobs=20, skip_special_tokens=False)
    (request,) = judge.llm.generate([official_prompt(*PAIRS[0])], params, use_tqdm=False)
    out = request.outputs[0]
    assert TIED_HIGH not in out.token_ids and TIED_LOW in out.token_ids, out.text
    top = out.logprobs[list(out.token_ids).index(TIED_LOW)]
    assert top[TIED_LOW].logprob == top[TIED_HIGH].logprob == max(t.logprob for t in top.values())
