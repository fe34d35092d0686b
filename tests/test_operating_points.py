"""The operating points' arithmetic on constructed runs, each with a known answer (quick tier): budgets derived from a
row's cuts, a cascade point's ranking (kept documents first by rank1, then the prefilter's order), the time model
solved from two runs and applied to token counts, the Pareto frontier, and a latency target's best point and ties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.runfile import Run, RunRow
from benchmarks.study import statistics as st
from benchmarks.study.operating_points import (
    OperatingPoint,
    TypeRuns,
    Work,
    analyse_points,
    choose,
    pareto,
    solve_time_model,
)
from rank1_local.core.results import BudgetCut

pytestmark = pytest.mark.quick


def row(q, d, score, n_tokens=20, forced=False, cuts=None, prompt=100):
    return RunRow(q, d, score, "r" * n_tokens, n_tokens, forced, prompt, False, cuts)


def point(name, seconds, ndcg, per_query=None):
    p = OperatingPoint(name, 8, None, 1, 1, st.Estimate(ndcg), st.Estimate(0.0), 0, seconds, "derived", None, Work())
    p.per_query_ndcg10 = per_query or {}
    return p


def test_the_frontier_keeps_the_points_nothing_beats_on_both():
    points = [point("a", 1.0, 0.5), point("b", 2.0, 0.7), point("c", 2.5, 0.6), point("d", 3.0, 0.7),
              point("e", 0.5, 0.4), point("f", 2.0, 0.7), point("g", 2.0, 0.65), point("h", 0.5, 0.3)]
    pareto(points)
    # c and d are beaten by b; b and f tie; g is as fast as b and worse, h as fast as e and worse
    assert [p.type for p in points if p.frontier] == ["a", "b", "e", "f"]


def test_a_target_names_the_best_point_within_it_and_the_ones_a_test_cannot_tell_apart():
    queries = [f"q{i}" for i in range(12)]
    best = {q: 0.9 for q in queries}
    close = {q: 0.9 - (0.01 if i % 2 else -0.005) for i, q in enumerate(queries)}  # differs, both ways: p large
    worse = {q: 0.5 for q in queries}  # 12 queries all 0.4 lower: p = 2/4096
    points = [point("best", 1.0, 0.9, best), point("close", 0.5, float(np.mean(list(close.values()))), close),
              point("worse", 0.2, 0.5, worse), point("slow", 9.0, 0.99, best)]
    target = choose(points, 2.0)
    assert target.best == points[0].name and target.tied == [points[1].name]
    assert target.tests[points[2].name]["p"] < 0.001 and points[3].name not in target.tests  # over the target
    nothing = choose(points, 0.1)
    assert nothing.best is None and nothing.fastest == points[2].name


def test_the_time_model_goes_through_both_runs():
    model = solve_time_model([("sweep", 10.0, Work(4, 400, 80, 2)), ("calibration", 3.0, Work(4, 400, 16, 4))])
    # 10 = 400a + 82b, 3 = 400a + 20b  ->  b = 7/62, a = (3 - 20b) / 400
    assert model.step == pytest.approx(7 / 62) and model.prompt == pytest.approx((3 - 20 * 7 / 62) / 400)
    assert model.seconds(Work(1, 100, 10, 1)) == pytest.approx(100 * model.prompt + 11 * model.step)


def test_points_from_runs_derive_budgets_cut_the_cascade_and_time_each():
    """One query, four documents (d1 relevant). rank1 at 64 tokens ranks d1 first; at 8 tokens its cut scores put d1
    last. The prefilter ranks d1 third, so with keep 2 it falls below the cut, under both kept documents although its
    prefilter score (0.65) is above their rank1 scores."""
    cut = lambda score: (BudgetCut(8, score, "r" * 8, True),)  # noqa: E731
    rows = {("q", "d1"): row("q", "d1", 0.9, 30, cuts=cut(0.1)), ("q", "d2"): row("q", "d2", 0.6, 6),
            ("q", "d3"): row("q", "d3", 0.5, 30, cuts=cut(0.4)), ("q", "d4"): row("q", "d4", 0.2, 30, cuts=cut(0.3))}
    sweep = Run(Path("T.jsonl"), rows, None)
    direct = Run(Path("T@8.jsonl"), {k: r.at_budget(8) for k, r in rows.items()}, None)
    prefilter = Run(Path("prefilter.jsonl"), {("q", d): row("q", d, s, 1) for d, s in
                                              (("d1", 0.65), ("d2", 0.9), ("d3", 0.7), ("d4", 0.1))}, None)
    ref = Run(Path("ref.jsonl"), {k: row(*k, 0.9 if k[1] == "d1" else 0.1) for k in rows}, None)
    qrels = {"q": {"d1": 1, "d2": 0, "d3": 0, "d4": 0}}
    t = TypeRuns("T", sweep, direct, {"T.jsonl": 10.0, "T@8.jsonl": 4.0}, 1000)
    out = analyse_points(ref, [t], [8, 64], qrels=qrels, order={("q", f"d{i}"): i for i in range(1, 5)},
                         prefilter=prefilter, prefilter_name="p.gguf", prefilter_seconds=2.0, prefilter_peak=500,
                         keeps=[2], target_latency=100.0)
    by = {(p.budget, p.keep): p for p in out.points}
    assert by[(64, None)].ndcg10.value == 1.0  # d1 first
    assert by[(8, None)].ndcg10.value == pytest.approx(1 / np.log2(5))  # d1 (0.1) last of four
    assert by[(64, 2)].ndcg10.value == pytest.approx(1 / np.log2(4))  # kept d2, d3, then d1 (prefilter 3rd)
    assert by[(64, 2)].judged == 2 and by[(64, 2)].peak_rss_bytes == 1500
    assert by[(8, None)].timing == "measured" and by[(8, None)].seconds_per_query == 4.0
    model = out.time_models["T"]
    assert model.measured == {"T.jsonl": 10.0, "T@8.jsonl": 4.0}
    assert by[(64, None)].seconds_per_query == pytest.approx(model.seconds(Work(4, 400, 96, 0)))
    assert by[(64, 2)].seconds_per_query == pytest.approx(model.seconds(Work(2, 200, 36, 0)) + 2.0)
    (check,) = out.checks
    assert (check.same_text, check.pairs, check.max_abs_diff) == (4, 4, 0.0)
    assert by[(8, None)].flip_count == 2 and by[(64, None)].flip_count == 1  # d2 (0.6) at both, d1 at 8
    assert out.target.best == by[(64, None)].name


def test_with_one_budget_the_runs_own_time_is_the_measured_point():
    """A prefilter without --budgets: the calibration run (1 token) only calibrates; the one budget's point is measured
    by the run itself, the cascade point derived."""
    rows = {("q", d): row("q", d, s, 10) for d, s in (("d1", 0.9), ("d2", 0.2))}
    calibration = Run(Path("T@1.jsonl"), {k: row(*k, 0.5, 1, forced=True) for k in rows}, None)
    prefilter = Run(Path("prefilter.jsonl"), {k: row(*k, 0.5, 1) for k in rows}, None)
    t = TypeRuns("T", Run(Path("T.jsonl"), rows, None), calibration, {"T.jsonl": 3.0, "T@1.jsonl": 1.0}, None)
    out = analyse_points(Run(Path("ref.jsonl"), rows, None), [t], [64], qrels={"q": {"d1": 1}}, order={},
                         prefilter=prefilter, prefilter_seconds=0.5, keeps=[1])
    plain, cascade = out.points
    assert (plain.timing, plain.seconds_per_query) == ("measured", 3.0) and not out.checks
    assert cascade.timing == "derived" and cascade.seconds_per_query == pytest.approx(
        out.time_models["T"].seconds(Work(1, 100, 10, 0)) + 0.5)
