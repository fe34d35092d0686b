"""The study's statistics on constructed runs whose answers are known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.runfile import Run, RunRow
from benchmarks.study import statistics as st
from benchmarks.study.analysis import analyse_run, compare_types, ranking_quality

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
    assert st.recall_at_k(scores, {"a": 0}, 2) == 0.0  # judged, nothing relevant: 0, as trec_eval
    assert st.recall_at_k(scores, {}, 2) is None  # not judged: not evaluated
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


# A hand-made example: q1 graded, q2 judged with nothing relevant, q3 not judged at all, q4 with ties in its scores.
EXAMPLE_QRELS = {"q1": {"a": 2, "b": 0, "c": 1, "z": 1}, "q2": {"a": 0, "b": 0}, "q4": {"b": 1, "c": 2}}
EXAMPLE_RUN = {("q1", "a"): 0.2, ("q1", "b"): 0.9, ("q1", "c"): 0.7, ("q2", "a"): 0.8, ("q2", "b"): 0.3,
               ("q3", "a"): 0.6, ("q3", "b"): 0.1, ("q4", "a"): 0.5, ("q4", "b"): 0.5, ("q4", "c"): 0.4}


def test_ndcg_and_recall_average_as_trec_eval_does():
    """nDCG@10 and Recall@10 over a run against ir_measures and pytrec_eval (trec_eval's own code): a judged query
    without a relevant document counts 0 and is averaged in; a query without judgments is not evaluated. By hand:
    q1 ranks b (0), c (1), a (2): DCG 1/log2 3 + 2/2 against the ideal 2 + 1/log2 3 + 1/2; q4 ranks b, a (tie broken
    by document id, descending), c: DCG 1 + 2/2 against 2 + 1/log2 3."""
    ir_measures = pytest.importorskip("ir_measures")
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from ir_measures import R, nDCG

    run = make_run("run", EXAMPLE_RUN)
    quality = ranking_quality(run, sorted(EXAMPLE_RUN), EXAMPLE_QRELS, (10,))
    q1 = (1 / math.log2(3) + 1) / (2 + 1 / math.log2(3) + 0.5)
    q4 = 2 / (2 + 1 / math.log2(3))
    assert quality.per_query_ndcg10 == pytest.approx({"q1": q1, "q2": 0.0, "q4": q4})
    assert quality.queries == 3 and quality.without_relevant == 1 and not quality.dropped
    assert quality.ndcg10 == pytest.approx((q1 + q4) / 3, abs=1e-12)
    assert quality.recall[10] == pytest.approx((2 / 3 + 0 + 1) / 3)
    qrels = [ir_measures.Qrel(q, d, g) for q, grades in EXAMPLE_QRELS.items() for d, g in grades.items()]
    docs = [ir_measures.ScoredDoc(q, d, s) for (q, d), s in EXAMPLE_RUN.items()]
    theirs = ir_measures.calc_aggregate([nDCG @ 10, R @ 10], qrels, docs)
    assert quality.ndcg10 == pytest.approx(theirs[nDCG @ 10], abs=1e-9)
    assert quality.recall[10] == pytest.approx(theirs[R @ 10], abs=1e-9)
    by_query = {}
    for (q, d), s in EXAMPLE_RUN.items():
        by_query.setdefault(q, {})[d] = s
    per_query = pytrec_eval.RelevanceEvaluator(EXAMPLE_QRELS, {"ndcg_cut.10"}).evaluate(by_query)
    assert set(per_query) == {"q1", "q2", "q4"}
    assert quality.ndcg10 == pytest.approx(np.mean([m["ndcg_cut_10"] for m in per_query.values()]), abs=1e-9)
    dropped = ranking_quality(run, sorted(EXAMPLE_RUN), EXAMPLE_QRELS, (10,), drop_without_relevant=True)
    assert dropped.queries == 2 and dropped.without_relevant == 1 and dropped.dropped
    assert dropped.ndcg10 == pytest.approx((q1 + q4) / 2) and dropped.recall[10] == pytest.approx((2 / 3 + 1) / 2)


def test_holm_adjusts_a_family_of_p_values():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04); None is no test
    assert st.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert st.holm([0.5, 0.9]) == [1.0, 1.0] and st.holm([]) == [] and st.holm([0.02]) == [0.02]


@pytest.mark.parametrize("drop", [False, True])
def test_the_report_says_which_queries_its_ndcg_averages_and_adjusts_its_p_values(drop):
    from benchmarks.study.report import METHODS, ReferenceSummary, StudyReport, render_markdown

    ref = make_run("ref", EXAMPLE_RUN)
    runs = [analyse_run(label, ref, make_run(label, {k: s + shift for k, s in EXAMPLE_RUN.items()}),
                        qrels=EXAMPLE_QRELS, recall_k=(10,), drop_without_relevant=drop)
            for label, shift in (("Q8_0", 0.01), ("Q4_K_M", 0.02))]
    raw = [0.02, 0.04]
    for r, p, adjusted in zip(runs, raw, st.holm(raw), strict=True):
        r.ndcg10_p, r.ndcg10_p_holm = p, adjusted
    quality = ranking_quality(ref, sorted(EXAMPLE_RUN), EXAMPLE_QRELS, (10,), drop_without_relevant=drop)
    reference = ReferenceSummary("reference", "vllm", "cpu", runs[0].cost, quality, runs[0].forced, 10.0)
    report = StudyReport("t", None, "pairs.jsonl", "m", 10, 4, quality.queries, None,
                         {"protocol": "official", "max_think_tokens": 64, "n_ctx": 512}, "x86_64", reference, runs)
    md = render_markdown(report, plot_name=None)
    if drop:
        assert "Means over the 2 judged queries with a relevant document: 1 judged query without one left out" in md
    else:
        assert "Means over all 3 judged queries, as trec_eval computes them: the 1 without a relevant document " \
               "count 0" in md
    assert "Holm-adjusted within each family" in METHODS and "p (paired randomization, Holm)" in md
    assert "| Q8_0 |" in md and "| 0.040 |" in md  # 0.02 of a family of two: 0.04 after Holm
