"""The study's statistics: small pure functions over arrays, each with a known answer on constructed runs.

Conventions:
- A *decision* is ``score > 0.5`` (the official code's); a *flip* is a pair whose decision differs from the
  reference's.
- Scores are P(true) of a two-way (true, false) distribution; the divergence of a run from the reference is the
  Kullback-Leibler divergence KL(reference || run) of those two Bernoulli distributions, in nats, with both
  probabilities clipped to [``EPS``, 1 - ``EPS``] so that a score of exactly 0 or 1 stays finite.
- Pairs of one query are not independent (one model, one query, one prompt prefix), so confidence intervals resample
  *queries*, not pairs: a cluster bootstrap (percentile, ``BOOTSTRAP`` resamples, fixed seed). A pair-level
  proportion of 0 or 1 has a degenerate bootstrap; its interval is then Wilson's score interval over the pairs.
- Differences between two runs over the same queries (ΔnDCG@10, or the damage of two quantization types) are
  tested with a two-sided **paired randomization (sign-flip) test** over queries: the statistic is the absolute mean
  of the per-query differences, exact over all 2^n sign patterns when at most ``EXACT_MAX`` queries differ, otherwise
  ``PERMUTATIONS`` random patterns with a fixed seed (p = (1 + hits) / (1 + draws)). Queries whose difference is 0
  change nothing under any sign, so identical runs give p = 1 exactly.
- nDCG@10 follows trec_eval: linear gains (the qrels grade), discount log2(rank + 1), documents ranked by score
  with ties broken by document id in descending order, the ideal ranking from every judged document of the query.
  A query with judgments but no relevant document scores 0 (trec_eval, ir_measures and pytrec_eval average it in;
  some papers leave such queries out: :func:`benchmarks.study.analysis.ranking_quality` can); a query without any
  judgment is not evaluated (trec_eval skips it). Recall@k the same.
- Several tests of one family (ΔnDCG@10 of every type against the reference; one statistic over the rows of a
  type-against-type table) are reported with Holm's step-down adjusted p-values (:func:`holm`), which keep the
  family-wise error rate at the level without assuming independence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-6
BOOTSTRAP = 2000
PERMUTATIONS = 20000
EXACT_MAX = 16
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval (``low``/``high`` None where no interval applies)."""

    value: float
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}


def decisions(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) > 0.5


def flips(reference: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Per pair: does the run's decision differ from the reference's?"""
    return decisions(reference) != decisions(run)


def bernoulli_kl(reference: np.ndarray, run: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Per pair KL(reference || run) of the (true, false) distributions, in nats."""
    p = np.clip(np.asarray(reference, dtype=np.float64), eps, 1.0 - eps)
    q = np.clip(np.asarray(run, dtype=np.float64), eps, 1.0 - eps)
    return p * np.log(p / q) + (1.0 - p) * np.log((1.0 - p) / (1.0 - q))


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion."""
    from scipy import stats

    if n == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue beside 0 or 1
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _groups(values: np.ndarray, groups: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums and counts of ``values`` (groups in first-seen order)."""
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(values, dtype=np.float64), minlength=len(keys))
    counts = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
    return sums, counts


def _bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def cluster_ratio(numerators: np.ndarray, denominators: np.ndarray, groups: Sequence[str] | np.ndarray, *,
                  resamples: int = BOOTSTRAP, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """sum(numerators) / sum(denominators) over pairs, with a percentile interval from resampling the groups
    (queries) with replacement."""
    num, _ = _groups(numerators, groups)
    den, _ = _groups(denominators, groups)
    total = den.sum()
    value = float(num.sum() / total) if total else float("nan")
    if len(num) < 2 or not total:
        return Estimate(value)
    idx = _bootstrap_indices(len(num), resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = num[idx].sum(1) / den[idx].sum(1)
    ratios = ratios[np.isfinite(ratios)]
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high))


def cluster_mean(values: np.ndarray, groups: Sequence[str] | np.ndarray, **kwargs: float) -> Estimate:
    """The mean of pair-level ``values`` with a cluster-bootstrap interval over ``groups`` (queries)."""
    values = np.asarray(values, dtype=np.float64)
    return cluster_ratio(values, np.ones_like(values), groups, **kwargs)  # type: ignore[arg-type]


def cluster_proportion(events: np.ndarray, groups: Sequence[str] | np.ndarray, *, level: float = LEVEL,
                       **kwargs: float) -> Estimate:
    """A pair-level proportion (flips, identical chains, forced answers) with a cluster-bootstrap interval; when no
    pair or every pair has the event the bootstrap cannot vary, and Wilson's interval over the pairs is used."""
    events = np.asarray(events, dtype=bool)
    k, n = int(events.sum()), len(events)
    if k in (0, n):
        low, high = wilson_interval(k, n, level)
        return Estimate(k / n if n else float("nan"), low, high)
    return cluster_mean(events.astype(np.float64), groups, level=level, **kwargs)


def mean_interval(values: np.ndarray, *, resamples: int = BOOTSTRAP, seed: int = SEED,
                  level: float = LEVEL) -> Estimate:
    """The mean of per-query values with a percentile bootstrap interval (each value is one query)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Estimate(float("nan"))
    return cluster_mean(values, np.arange(len(values)), resamples=resamples, seed=seed, level=level)


def paired_randomization_test(differences: np.ndarray, *, permutations: int = PERMUTATIONS,
                              seed: int = SEED) -> float:
    """Two-sided p-value of a paired sign-flip test of mean(differences) = 0 (one difference per query)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0.0]
    if len(d) == 0:
        return 1.0
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if len(d) <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        stats_ = np.abs(signs @ d) / len(d)
        return float(np.mean(stats_ >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    for lo in range(0, permutations, 5000):
        n = min(5000, permutations - lo)
        signs = rng.choice((-1.0, 1.0), size=(n, len(d)))
        hits += int(np.sum(np.abs(signs @ d) / len(d) >= observed - tolerance))
    return (1 + hits) / (1 + permutations)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of one family of tests (None entries are not tests and stay None): the
    i-th smallest of m raw p-values becomes max over j ≤ i of min(1, (m − j + 1) · p_(j))."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def ranked(scores: Mapping[str, float]) -> list[str]:
    """Document ids best first, ties broken by document id in descending order (trec_eval's order)."""
    by_id = sorted(scores, reverse=True)
    return sorted(by_id, key=lambda d: -scores[d])  # stable: equal scores keep the descending id order


def ndcg_at_k(scores: Mapping[str, float], qrels: Mapping[str, int], k: int = 10) -> float | None:
    """nDCG@k of one query (trec_eval's definition): 0 when its judgments hold no relevant document, None when it
    has no judgment at all (trec_eval does not evaluate it)."""
    if not qrels:
        return None
    gains = sorted((g for g in qrels.values() if g > 0), reverse=True)
    if not gains:
        return 0.0
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
    got = sum(max(qrels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked(scores)[:k]))
    return got / ideal


def recall_at_k(scores: Mapping[str, float], qrels: Mapping[str, int], k: int, *, min_grade: int = 1) -> float | None:
    """The share of the query's relevant documents (grade >= ``min_grade``) ranked in the top ``k``: 0 when it has
    judgments but no relevant document, None when it has no judgment (as :func:`ndcg_at_k`). Relevant documents the
    first stage never retrieved count as missed."""
    if not qrels:
        return None
    relevant = {d for d, g in qrels.items() if g >= min_grade}
    if not relevant:
        return 0.0
    return len(relevant & set(ranked(scores)[:k])) / len(relevant)


def rank_correlations(reference: Sequence[float], run: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman's rho and Kendall's tau-b of one query's scores; (1, 1) for identical scores, None where the
    statistic is undefined (a query with fewer than two documents, or constant scores on either side)."""
    from scipy import stats

    a, b = np.asarray(reference, dtype=np.float64), np.asarray(run, dtype=np.float64)
    if len(a) < 2:
        return None, None
    if np.array_equal(a, b):
        return (1.0, 1.0) if np.ptp(a) > 0 else (None, None)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    rho = float(stats.spearmanr(a, b).statistic)
    tau = float(stats.kendalltau(a, b).statistic)
    return (rho if np.isfinite(rho) else None), (tau if np.isfinite(tau) else None)


def divergence_position(a: Sequence[object], b: Sequence[object]) -> int:
    """The first position where two sequences differ (the length of their common prefix)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
