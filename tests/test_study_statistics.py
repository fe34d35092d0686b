"""The study's statistics on constructed runs whose answers are known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.runfile import Run, RunRow
from benchmarks.study import statistics as st
from benchmarks.study.analysis import analyse_run, compare_types

pytestmark = pytest.mark.quick


def make_run(name: str, scores: dict[tuple[str, str], float], reasoning: dict | None = None,
             tokens: int = 10) -> Run:
    rows = {k: RunRow(k[0], k[1], s, (reasoning or {}).get(k, "a b c"), tokens, False) for k, s in scores.items()}
    return Run(Path(f"{name}.jsonl"), rows, None)


def ranked_queries(n_queries: int, docs: int = 5) -> dict[tuple[str, str], float]:
    """Query q has documents d0 … d4 scored 0.95, 0.85, … 0.55 (d0 first)."""
    return {(f"q{q:02d}", f"d{d}"): 0.95 - 0.1 * d for q in range(n_queries) for d in range(docs)}


def test_identical_runs_have_no_flips_no_divergence_and_p_one():
    scores = ranked_queries(12)
    qrels = {f"q{q:02d}": {"d0": 1, "d3": 2} for q in range(12)}
    ref = make_run("ref", scores)
    r = analyse_run("same", ref, make_run("same", scores), qrels=qrels, recall_k=(2,))
    assert r.flip_count == 0 and r.flips.value == 0.0 and r.queries_with_flip == 0
    assert r.flips.low == 0.0 and 0.0 < r.flips.high < 0.1  # Wilson's interval for 0 of 60 pairs
    assert r.kl_mean.value == 0.0 and r.kl_median == 0.0 and r.kl_p99 == 0.0
    assert r.abs_diff_max == 0.0 and r.spearman.value == 1.0 and r.kendall.value == 1.0
    assert r.identical_chains.value == 1.0 and r.median_divergence is None
    assert r.tokens_ratio.value == 1.0
    assert r.ndcg10_delta.value == 0.0 and r.ndcg10_p == 1.0


def test_swapping_the_top_two_of_half_the_queries():
    n = 20
    ref_scores = ranked_queries(n)
    qrels = {f"q{q:02d}": {"d0": 1} for q in range(n)}  # the top document is the only relevant one
    run_scores = dict(ref_scores)
    for q in range(0, n, 2):  # half the queries: d1 above d0
        run_scores[(f"q{q:02d}", "d0")], run_scores[(f"q{q:02d}", "d1")] = 0.85, 0.95
    ref, run = make_run("ref", ref_scores), make_run("run", run_scores)
    r = analyse_run("swap", ref, run, qrels=qrels, recall_k=(1,))
    # a swapped query: the relevant document at rank 2 -> nDCG 1/log2(3); the others stay at 1
    expected = (n / 2) * (1 / math.log2(3) - 1) / n
    assert r.ndcg10_delta.value == pytest.approx(expected)
    assert r.quality.ndcg10 == pytest.approx(1 + expected) and r.quality.recall[1] == pytest.approx(0.5)
    # ten equal non-zero differences: only the two all-same-sign patterns of 2^10 reach the observed mean
    assert r.ndcg10_p == pytest.approx(2 / 2 ** 10)
    assert r.ndcg10_delta.high < 0
    # scores moved by 0.1 on 20 of 100 pairs; decisions (both above 0.5) do not flip
    assert r.flip_count == 0 and r.abs_diff_mean.value == pytest.approx(20 * 0.1 / 100)
    assert r.kendall.value == pytest.approx(0.5 * 1 + 0.5 * (1 - 2 * 1 / 10))  # one discordant pair of 10


def test_kl_flips_and_wilson_known_values():
    assert st.bernoulli_kl(np.array([0.5]), np.array([0.25]))[0] == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert np.isfinite(st.bernoulli_kl(np.array([1.0]), np.array([0.0]))[0])  # clipped, not infinite
    assert st.flips(np.array([0.6, 0.4, 0.5]), np.array([0.4, 0.4, 0.51])).tolist() == [True, False, True]
    low, high = st.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = st.wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_paired_randomization_exact_and_sampled():
    # d = 1, 2, 3: |mean| reaches 2 only with all signs equal: 2 of 8 patterns
    assert st.paired_randomization_test(np.array([1.0, 2.0, 3.0, 0.0])) == pytest.approx(0.25)
    assert st.paired_randomization_test(np.zeros(30)) == 1.0
    # 40 queries all +1: the sampled test can only report its floor, 1/(1 + permutations)
    assert st.paired_randomization_test(np.ones(40)) == pytest.approx(1 / (1 + st.PERMUTATIONS))
    # symmetric noise: not significant
    rng = np.random.default_rng(3)
    assert st.paired_randomization_test(rng.normal(0, 1, 40)) > 0.05


def test_ndcg_matches_ir_measures_with_ties():
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import nDCG

    rng = np.random.default_rng(7)
    qrels, docs = [], []
    mine = []
    for q in range(15):
        grades = {f"d{d}": int(rng.integers(0, 3)) for d in range(12)}
        grades["d0"] = 2
        scores = {f"d{d}": float(rng.integers(0, 4)) / 4 for d in range(14)}  # coarse scores: many ties
        qrels += [ir_measures.Qrel(f"q{q}", d, g) for d, g in grades.items()]
        docs += [ir_measures.ScoredDoc(f"q{q}", d, s) for d, s in scores.items()]
        mine.append(st.ndcg_at_k(scores, grades, 10))
    expected = ir_measures.calc_aggregate([nDCG @ 10], qrels, docs)[nDCG @ 10]
    assert float(np.mean(mine)) == pytest.approx(expected, abs=1e-9)


def test_recall_and_rank_correlations():
    scores = {"a": 0.9, "b": 0.8, "c": 0.1}
    assert st.recall_at_k(scores, {"a": 1, "c": 1, "z": 2}, 2) == pytest.approx(1 / 3)  # z was never retrieved
    assert st.recall_at_k(scores, {"a": 0}, 2) is None
    assert st.rank_correlations([1, 2, 3], [3, 2, 1]) == pytest.approx((-1.0, -1.0))
    assert st.rank_correlations([1, 1, 1], [1, 2, 3]) == (None, None)
    assert st.ranked({"x": 0.5, "y": 0.5, "w": 0.9}) == ["w", "y", "x"]  # ties: document id descending


def test_intervals_cover_the_true_value_in_simulation():
    """95% intervals from the cluster bootstrap contain the true mean about 95% of the time (clustered data)."""
    rng = np.random.default_rng(11)
    sims, queries, per_query = 300, 30, 8
    covered_mean = covered_prop = 0
    for s in range(sims):
        centres = rng.normal(0.0, 1.0, queries)  # a query effect shared by its pairs
        values = (centres[:, None] + rng.normal(0.0, 1.0, (queries, per_query))).ravel()
        groups = np.repeat(np.arange(queries), per_query)
        e = st.cluster_mean(values, groups, resamples=1000, seed=s)
        covered_mean += e.low <= 0.0 <= e.high
        p = rng.beta(2, 8, queries)  # true flip rate 0.2, varying by query
        events = (rng.random((queries, per_query)) < p[:, None]).ravel()
        e = st.cluster_proportion(events, groups, resamples=1000, seed=s)
        covered_prop += e.low <= 0.2 <= e.high
    assert 0.90 <= covered_mean / sims <= 0.99
    assert 0.90 <= covered_prop / sims <= 0.99


def test_compare_types_detects_the_more_damaging_type():
    n = 24
    ref_scores = ranked_queries(n)
    light = {k: s + 0.01 for k, s in ref_scores.items()}
    heavy = {k: (1.0 - s if k[1] in ("d0", "d4") else s + 0.05) for k, s in ref_scores.items()}  # flips d0 and d4
    ref = make_run("ref", ref_scores)
    c = compare_types(ref, ("light", make_run("light", light)), ("heavy", make_run("heavy", heavy)))
    assert c.flip_rate.value == pytest.approx(0.4) and c.flip_p < 0.001
    assert c.kl.value > 0 and c.kl_p < 0.001 and c.abs_diff.value > 0
    same = compare_types(ref, ("a", make_run("a", light)), ("b", make_run("b", light)))
    assert same.flip_p == same.kl_p == same.abs_diff_p == 1.0
