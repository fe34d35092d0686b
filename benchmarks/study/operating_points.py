"""The operating points of a study: every (type, reasoning budget, prefilter cut), its quality, its decisions against
the reference, its time per query on this machine and its memory; the Pareto frontier of time against nDCG@10; and,
for a target latency, the best point and the points a paired test cannot tell apart from it.

Where each number comes from:

- A budget B below the largest is derived from the type's one generation (``ScoringConfig.derive_budgets``: a chain
  that closed within B tokens gives the same result, one that did not is cut at B and answered as a run with budget B;
  tests/test_budgets.py checks it against direct runs). The type's *calibration* run, scored directly at the smallest
  budget, repeats that check here (:class:`DerivationCheck`).
- A cascade point (rank1 on the prefilter's best N per query) takes rank1's results on the kept documents from the
  type's run over every document (a cascade gives rank1's own scores on them: tests/test_cascade.py) and the
  prefilter's results below the cut, in the prefilter's order (ties: input order), as ``rerank --prefilter`` does.
- Time: one point per type is *measured* (its scoring time, from its run header): the calibration run's, or with one
  budget (a prefilter alone: its calibration run has 1 token, a budget of its own), the type's run itself. The others
  are *derived* from token counts: seconds = a × prompt tokens + b × (generated tokens + forced answers), where a and
  b are the type's costs per prompt token and per generated token on this machine, solved from its two runs (the
  calibration run and the budget sweep's own run, whose cuts' forced answers it counts); a forced answer costs about
  one step. A cascade point adds the prefilter's measured time over every document.
- Peak memory: the peak resident memory of the type's scoring processes (and, for a cascade point, the prefilter's
  process too: the sum, as both models are loaded together).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.runfile import Key, Run, RunRow
from benchmarks.study import statistics as st
from rank1_local.core.errors import Rank1Error

Qrels = Mapping[str, Mapping[str, int]]
ALPHA = 0.05  # the level of the paired tests that tell points apart from the best one
TIER = 2.0  # added to a cascade's kept scores when ranking (every score is in [0, 1]): kept documents come first


@dataclass
class TimeModel:
    """One type's cost on this machine: ``prompt`` seconds per prompt token and ``step`` seconds per generated token
    (or forced answer), from its ``measured`` runs (name -> seconds)."""

    prompt: float
    step: float
    measured: dict[str, float]

    def seconds(self, work: Work) -> float:
        return self.prompt * work.prompt_tokens + self.step * (work.generated_tokens + work.forced)


@dataclass
class Work:
    """What scoring some pairs costs in tokens."""

    pairs: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forced: int = 0  # forced answers: one fallback prompt each

    def add(self, row: RunRow, prompt_tokens: int) -> None:
        self.pairs += 1
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += row.n_tokens
        self.forced += row.forced


@dataclass
class DerivationCheck:
    """A type's derived results at the calibration budget against its direct run there."""

    type: str
    budget: int
    pairs: int
    same_text: int  # pairs whose chain, token count and forced flag are the direct run's
    max_abs_diff: float  # the largest |Δscore|


@dataclass
class OperatingPoint:
    type: str
    budget: int
    keep: int | None  # documents per query rank1 judges (None: every one)
    queries: int
    judged: int  # pairs rank1 judged
    ndcg10: st.Estimate | None
    flips: st.Estimate  # among the pairs rank1 judged, against the reference
    flip_count: int
    seconds_per_query: float | None
    timing: str  # "measured" or "derived"
    peak_rss_bytes: int | None
    work: Work
    frontier: bool = False
    per_query_ndcg10: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"{self.type} · {self.budget} tokens · " + ("all documents" if self.keep is None else
                                                          f"prefilter top {self.keep}")


@dataclass
class TargetChoice:
    """For a latency target: the best point within it (by nDCG@10; ties: the faster) and, for each other point within
    it, the paired randomization test of its per-query nDCG@10 against the best's (raw p-values: a point is called
    indistinguishable only when its own test finds no difference at ``ALPHA``)."""

    seconds: float
    best: str | None
    tied: list[str]  # points within the target the test cannot tell apart from the best
    tests: dict[str, dict[str, float]]  # point -> {"delta": mean ΔnDCG@10 (point − best), "p": p-value}
    fastest: str | None = None  # when no point meets the target: the fastest one


@dataclass
class OperatingPoints:
    points: list[OperatingPoint]
    time_models: dict[str, TimeModel]
    checks: list[DerivationCheck]
    prefilter: str | None
    prefilter_seconds: float | None  # the prefilter's measured time over every pair
    prefilter_peak_rss_bytes: int | None
    target: TargetChoice | None = None


def prompt_tokens(run: Run) -> dict[Key, int]:
    """Each pair's prompt tokens, from its row (a pair too long to run costs none)."""
    out = {}
    for key, row in run.rows.items():
        if row.n_prompt_tokens is None:
            raise Rank1Error(f"{run.path}: row {key} has no n_prompt_tokens (written by an older rank1-local); the "
                             "operating points need each pair's token counts: score this run again")
        out[key] = 0 if row.too_long else row.n_prompt_tokens
    return out


def budget_of(calibration: Run) -> int:
    """A calibration run's budget, from its name (``TYPE@BUDGET.jsonl``)."""
    return int(calibration.path.name.removesuffix(".jsonl").rsplit("@", 1)[1])


def solve_time_model(runs: Sequence[tuple[str, float, Work]]) -> TimeModel:
    """The two costs that fit the measured runs best, neither negative (least squares; exact through two runs)."""
    from scipy.optimize import nnls

    a = np.array([[w.prompt_tokens, w.generated_tokens + w.forced] for _, _, w in runs], dtype=np.float64)
    b = np.array([seconds for _, seconds, _ in runs], dtype=np.float64)
    if len(runs) == 1:  # one run: all of its time per generated token (a type with one point needs no more)
        w = runs[0][2]
        step = runs[0][1] / max(1, w.generated_tokens + w.forced)
        return TimeModel(0.0, step, {runs[0][0]: runs[0][1]})
    (prompt, step), _ = nnls(a, b)
    return TimeModel(float(prompt), float(step), {name: seconds for name, seconds, _ in runs})


def pareto(points: Sequence[OperatingPoint]) -> None:
    """Mark the points no other point beats on both time and nDCG@10 (as fast or faster and as good or better, one of
    them strictly)."""
    rated = [(p, p.seconds_per_query, p.ndcg10.value) for p in points
             if p.ndcg10 is not None and p.seconds_per_query is not None]
    for p in points:
        p.frontier = False
    for p, t, n in rated:
        p.frontier = not any(q is not p and u <= t and m >= n and (u < t or m > n) for q, u, m in rated)


def choose(points: Sequence[OperatingPoint], seconds: float) -> TargetChoice:
    """The best point within ``seconds`` per query, and those a paired test cannot tell apart from it."""
    rated = [p for p in points if p.ndcg10 is not None and p.seconds_per_query is not None]
    within = [p for p in rated if p.seconds_per_query <= seconds]  # type: ignore[operator]
    if not within:
        fastest = min(rated, key=lambda p: p.seconds_per_query, default=None)  # type: ignore[arg-type,return-value]
        return TargetChoice(seconds, None, [], {}, fastest.name if fastest else None)
    best = max(within, key=lambda p: (p.ndcg10.value, -p.seconds_per_query))  # type: ignore[union-attr,operator]
    tests, tied = {}, []
    for p in within:
        if p is best:
            continue
        queries = sorted(set(p.per_query_ndcg10) & set(best.per_query_ndcg10))
        d = np.array([p.per_query_ndcg10[q] - best.per_query_ndcg10[q] for q in queries])
        pvalue = st.paired_randomization_test(d)
        tests[p.name] = {"delta": float(d.mean()) if len(d) else 0.0, "p": pvalue}
        if pvalue >= ALPHA:
            tied.append(p.name)
    return TargetChoice(seconds, best.name, tied, tests)


def cascade_order(prefilter: Run, order: Mapping[Key, int]) -> dict[str, list[str]]:
    """Per query, its documents by the prefilter's score (ties: the pairs file's order), as a cascade ranks them."""
    by_query: dict[str, list[str]] = {}
    for (qid, docid) in sorted(prefilter.rows, key=lambda k: (-prefilter.rows[k].score, order.get(k, 0))):
        by_query.setdefault(qid, []).append(docid)
    return by_query


def _flips(ref: Run, rows: Mapping[Key, RunRow]) -> tuple[st.Estimate, int]:
    keys = sorted(k for k in rows if k in ref.rows)
    a = np.array([ref.rows[k].score for k in keys])
    b = np.array([rows[k].score for k in keys])
    flipped = st.flips(a, b)
    return st.cluster_proportion(flipped, np.array([q for q, _ in keys])), int(flipped.sum())


def _ndcg(scores: Mapping[Key, float], qrels: Qrels | None, drop_without_relevant: bool) -> dict[str, float]:
    by_query: dict[str, dict[str, float]] = {}
    for (qid, docid), score in scores.items():
        by_query.setdefault(qid, {})[docid] = score
    out = {}
    for qid, docs in by_query.items():
        judged = (qrels or {}).get(qid, {})
        value = st.ndcg_at_k(docs, judged, 10)
        if value is None or (drop_without_relevant and not any(g > 0 for g in judged.values())):
            continue
        out[qid] = value
    return out


@dataclass
class TypeRuns:
    """One type's runs and what they cost: its budget sweep, its calibration run (None: one budget, nothing derived),
    each run's measured scoring time by file name, its peak memory."""

    label: str
    sweep: Run
    calibration: Run | None
    seconds: Mapping[str, float | None]
    peak: int | None


def calibrate(t: TypeRuns, budgets: Sequence[int], tokens: Mapping[Key, int]) -> tuple[
        TimeModel | None, DerivationCheck | None, tuple[int, str] | None]:
    """A type's time model (from its sweep run, whose cuts' forced answers it counts, and its calibration run), the
    derivation against the calibration run, and the point whose time is measured with the run that measured it: the
    calibration run's, or with one budget and nothing derived, the sweep run's own (None when it has no time)."""
    sweep_work = Work()
    for key, row in t.sweep.rows.items():
        sweep_work.add(row, tokens[key])
        sweep_work.forced += sum(c.forced for c in row.cuts or ())
    runs = [(t.sweep.path.name, sweep_work)]
    check, measured = None, None
    if t.calibration is not None:
        direct, budget = t.calibration, budget_of(t.calibration)
        work = Work()
        for key, row in direct.rows.items():
            work.add(row, tokens.get(key, 0))
        runs.append((direct.path.name, work))
        if budget in budgets:
            measured = (budget, direct.path.name)
            derived = {k: r.at_budget(budget) for k, r in t.sweep.rows.items()}
            common = sorted(set(derived) & set(direct.rows))
            check = DerivationCheck(t.label, budget, len(common), sum(
                (derived[k].reasoning, derived[k].n_tokens, derived[k].forced) ==
                (direct.rows[k].reasoning, direct.rows[k].n_tokens, direct.rows[k].forced) for k in common),
                max((abs(derived[k].score - direct.rows[k].score) for k in common), default=0.0))
    if measured is None and len(budgets) == 1:
        measured = (budgets[0], t.sweep.path.name)
    times = [t.seconds.get(name) for name, _ in runs]
    if any(s is None for s in times):
        return None, check, None
    return solve_time_model([(name, float(s), w) for (name, w), s in zip(runs, times)]), check, measured


def analyse_points(ref: Run, types: Sequence[TypeRuns], budgets: Sequence[int], *, qrels: Qrels | None,
                   order: Mapping[Key, int], prefilter: Run | None = None, prefilter_name: str | None = None,
                   prefilter_seconds: float | None = None, prefilter_peak: int | None = None,
                   keeps: Sequence[int] = (), target_latency: float | None = None,
                   drop_without_relevant: bool = False) -> OperatingPoints:
    """Every operating point of the study from its run files: per type, budget and cut (None: every document) its
    rows (derived from the sweep's cuts; a cascade's kept rows, the prefilter's below them), its quality, flips,
    time and memory (``order``: each pair's position in the pairs file, which breaks the prefilter's ties)."""
    budgets = sorted(budgets)
    ranking = cascade_order(prefilter, order) if prefilter is not None else {}
    queries = len({q for q, _ in ref.rows})
    points, models, checks = [], {}, []
    for t in types:
        tokens = prompt_tokens(t.sweep)
        model, check, measured = calibrate(t, budgets, tokens)
        if model is not None:
            models[t.label] = model
        if check is not None:
            checks.append(check)
        for budget in budgets:
            rows = t.sweep.rows if budget == budgets[-1] else {k: r.at_budget(budget) for k, r in t.sweep.rows.items()}
            for keep in (None, *keeps):
                if keep is None:
                    judged, scores = rows, {k: r.score for k, r in rows.items()}
                else:
                    assert prefilter is not None
                    kept = {(q, d) for q, docs in ranking.items() for d in docs[:keep]}
                    judged = {k: r for k, r in rows.items() if k in kept}
                    scores = {k: rows[k].score + TIER if k in kept else prefilter.rows[k].score
                              for k in prefilter.rows if k in rows}
                work = Work()
                for key, row in judged.items():
                    work.add(row, tokens.get(key, 0))
                timing, total = "derived", None
                if model is not None and keep is None and measured is not None and budget == measured[0]:
                    timing, total = "measured", model.measured[measured[1]]
                elif model is not None and (keep is None or prefilter_seconds is not None):
                    total = model.seconds(work) + (prefilter_seconds or 0.0 if keep is not None else 0.0)
                ndcg = _ndcg(scores, qrels, drop_without_relevant) if qrels is not None else {}
                flips, flip_count = _flips(ref, judged)
                peak = t.peak + prefilter_peak if keep is not None and t.peak and prefilter_peak else t.peak
                points.append(OperatingPoint(
                    t.label, budget, keep, queries, len(judged),
                    st.mean_interval(np.array(list(ndcg.values()))) if ndcg else None, flips, flip_count,
                    None if total is None else total / queries, timing, peak, work, per_query_ndcg10=ndcg))
    pareto(points)
    result = OperatingPoints(points, models, checks, prefilter_name, prefilter_seconds, prefilter_peak)
    if target_latency is not None:
        if qrels is None:
            raise Rank1Error("--target-latency picks by nDCG@10, which needs qrels")
        result.target = choose(points, target_latency)
    return result


def points_from_json(data: Mapping[str, Any]) -> OperatingPoints:
    """:class:`OperatingPoints` read back from study.json (with each point's per-query nDCG@10, from which the
    target's tests follow)."""
    def estimate(value: Any) -> st.Estimate | None:
        return None if value is None else st.Estimate(value["value"], value["low"], value["high"])

    points = [OperatingPoint(**{**p, "ndcg10": estimate(p["ndcg10"]), "flips": estimate(p["flips"]),
                                "work": Work(**p["work"])}) for p in data["points"]]
    target = TargetChoice(**data["target"]) if data.get("target") else None
    return OperatingPoints(points, {k: TimeModel(**v) for k, v in data["time_models"].items()},
                           [DerivationCheck(**c) for c in data["checks"]], data.get("prefilter"),
                           data.get("prefilter_seconds"), data.get("prefilter_peak_rss_bytes"), target)
