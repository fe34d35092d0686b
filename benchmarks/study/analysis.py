"""Everything a study reports about one run against the reference, and about two types against each other.

:func:`analyse_run` turns a reference run and a run (plus qrels, a tokenizer and the run's cost records) into a
:class:`TypeResult`; :func:`compare_types` tests whether one type damages more than another, query by query. All the
arithmetic is in :mod:`benchmarks.study.statistics`.
"""

from __future__ import annotations

import statistics as stdlib_statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.runfile import Key, Run
from benchmarks.study import statistics as st
from rank1_local.core.errors import Rank1Error

Qrels = Mapping[str, Mapping[str, int]]
TOP_K = 10


@dataclass
class RunCost:
    """What a run cost: model size, speed (from the run header) and peak memory (from the job record)."""

    model_bytes: int | None = None
    pairs_per_second: float | None = None
    peak_rss_bytes: int | None = None
    backend: str | None = None
    device: str | None = None


@dataclass
class RankingQuality:
    """nDCG@10 (and Recall@k) against the qrels, averaged over the judged queries as trec_eval averages them: a query
    without a relevant document counts 0 (``without_relevant`` of them), unless ``dropped``: then those queries are
    left out, as some papers do."""

    queries: int  # in the mean
    ndcg10: float
    recall: dict[int, float]
    per_query_ndcg10: dict[str, float]
    without_relevant: int = 0  # judged queries with no relevant document (counted 0, or dropped)
    dropped: bool = False


@dataclass
class TypeResult:
    label: str
    common: int
    missing: int  # reference rows the run lacks
    queries: int
    flips: st.Estimate
    flip_count: int
    queries_with_flip: int
    flips_per_query: dict[str, int]
    kl_mean: st.Estimate
    kl_median: float
    kl_p99: float
    abs_diff_mean: st.Estimate
    abs_diff_max: float
    spearman: st.Estimate
    kendall: st.Estimate
    identical_chains: st.Estimate
    median_divergence: float | None
    divergence_unit: str
    tokens_reference: float
    tokens_run: float
    tokens_ratio: st.Estimate
    forced: st.Estimate
    cost: RunCost
    quality: RankingQuality | None = None
    ndcg10_delta: st.Estimate | None = None
    ndcg10_p: float | None = None
    ndcg10_p_holm: float | None = None  # Holm-adjusted over the study's types (set by the report)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # estimates become {"value", "low", "high"}


def common_keys(ref: Run, run: Run) -> list[Key]:
    keys = sorted(set(ref.rows) & set(run.rows))
    if not keys:
        raise Rank1Error(f"{run.path} and {ref.path} have no (qid, docid) in common")
    return keys


def ranking_quality(run: Run, keys: Sequence[Key], qrels: Qrels, recall_k: Sequence[int], *,
                    drop_without_relevant: bool = False) -> RankingQuality | None:
    """nDCG@10 and Recall@k of ``run`` over ``keys`` against ``qrels``, averaged over the judged queries (trec_eval's
    mean: a query without a relevant document counts 0; ``drop_without_relevant`` leaves such queries out); None if
    no query is judged (or, dropping, none has a relevant document)."""
    by_query: dict[str, dict[str, float]] = {}
    for qid, docid in keys:
        by_query.setdefault(qid, {})[docid] = run.rows[(qid, docid)].score
    ndcg: dict[str, float] = {}
    recall: dict[int, list[float]] = {k: [] for k in recall_k}
    without_relevant = 0
    for qid, scores in by_query.items():
        judged = qrels.get(qid, {})
        value = st.ndcg_at_k(scores, judged, TOP_K)
        if value is None:
            continue
        if not any(g > 0 for g in judged.values()):
            without_relevant += 1
            if drop_without_relevant:
                continue
        ndcg[qid] = value
        for k in recall_k:
            r = st.recall_at_k(scores, judged, k)
            if r is not None:
                recall[k].append(r)
    if not ndcg:
        return None
    return RankingQuality(len(ndcg), float(np.mean(list(ndcg.values()))),
                          {k: float(np.mean(v)) for k, v in recall.items() if v}, ndcg, without_relevant,
                          drop_without_relevant)


def analyse_run(label: str, ref: Run, run: Run, *, qrels: Qrels | None = None, recall_k: Sequence[int] = (),
                tokenize: Callable[[str], list[int]] | None = None, cost: RunCost | None = None,
                drop_without_relevant: bool = False) -> TypeResult:
    """Every per-type statistic of ``run`` against the reference ``ref`` over the pairs both hold (nDCG@10 and
    Recall@k as :func:`ranking_quality` computes them)."""
    keys = common_keys(ref, run)
    groups = np.array([q for q, _ in keys])
    a = np.array([ref.rows[k].score for k in keys])
    b = np.array([run.rows[k].score for k in keys])
    flipped = st.flips(a, b)
    kl = st.bernoulli_kl(a, b)
    diff = np.abs(a - b)
    per_query_flips: dict[str, int] = {}
    for (qid, _), f in zip(keys, flipped):
        per_query_flips[qid] = per_query_flips.get(qid, 0) + int(f)
    rhos, taus = [], []
    for qid in dict.fromkeys(groups):
        mask = groups == qid
        rho, tau = st.rank_correlations(a[mask], b[mask])
        if rho is not None:
            rhos.append(rho)
        if tau is not None:
            taus.append(tau)
    same = np.array([ref.rows[k].reasoning == run.rows[k].reasoning for k in keys])
    divergences = []
    for k, s in zip(keys, same):
        if not s:
            x, y = ref.rows[k].reasoning, run.rows[k].reasoning
            divergences.append(st.divergence_position(tokenize(x), tokenize(y)) if tokenize
                               else st.divergence_position(x, y))
    tokens_ref = np.array([ref.rows[k].n_tokens for k in keys], dtype=np.float64)
    tokens_run = np.array([run.rows[k].n_tokens for k in keys], dtype=np.float64)
    result = TypeResult(
        label=label, common=len(keys), missing=len(set(ref.rows) - set(run.rows)), queries=len(set(groups)),
        flips=st.cluster_proportion(flipped, groups), flip_count=int(flipped.sum()),
        queries_with_flip=sum(1 for v in per_query_flips.values() if v), flips_per_query=per_query_flips,
        kl_mean=st.cluster_mean(kl, groups), kl_median=float(np.median(kl)), kl_p99=float(np.quantile(kl, 0.99)),
        abs_diff_mean=st.cluster_mean(diff, groups), abs_diff_max=float(diff.max()),
        spearman=st.mean_interval(np.array(rhos)), kendall=st.mean_interval(np.array(taus)),
        identical_chains=st.cluster_proportion(same, groups),
        median_divergence=float(stdlib_statistics.median(divergences)) if divergences else None,
        divergence_unit="tokens" if tokenize else "characters",
        tokens_reference=float(tokens_ref.mean()), tokens_run=float(tokens_run.mean()),
        tokens_ratio=st.cluster_ratio(tokens_run, tokens_ref, groups),
        forced=st.cluster_proportion(np.array([run.rows[k].forced for k in keys]), groups),
        cost=cost or RunCost())
    if qrels is not None:
        result.quality = ranking_quality(run, keys, qrels, recall_k, drop_without_relevant=drop_without_relevant)
        ref_quality = ranking_quality(ref, keys, qrels, recall_k, drop_without_relevant=drop_without_relevant)
        if result.quality is not None and ref_quality is not None:
            queries = sorted(ref_quality.per_query_ndcg10)
            d = np.array([result.quality.per_query_ndcg10[q] - ref_quality.per_query_ndcg10[q] for q in queries])
            result.ndcg10_delta = st.mean_interval(d)
            result.ndcg10_p = st.paired_randomization_test(d)
    return result


@dataclass
class TypeComparison:
    """Does ``second`` damage more than ``first``? Per-query differences (second - first) of the flip rate, the
    mean KL divergence and the mean |Δscore| against the reference, each with its paired randomization p-value."""

    first: str
    second: str
    flip_rate: st.Estimate
    flip_p: float
    kl: st.Estimate
    kl_p: float
    abs_diff: st.Estimate
    abs_diff_p: float
    ndcg10: st.Estimate | None = None
    ndcg10_p: float | None = None
    # Holm-adjusted over the rows of the comparison's table, one family per statistic (set by the report)
    holm: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def per_query_damage(ref: Run, run: Run) -> dict[str, tuple[float, float, float]]:
    """Per query: (flip rate, mean KL, mean |Δscore|) of ``run`` against the reference."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for key in common_keys(ref, run):
        a, b = ref.rows[key].score, run.rows[key].score
        out.setdefault(key[0], []).append((float(st.flips(np.array([a]), np.array([b]))[0]),
                                           float(st.bernoulli_kl(np.array([a]), np.array([b]))[0]), abs(a - b)))
    return {q: tuple(np.mean(np.array(v), axis=0)) for q, v in out.items()}  # type: ignore[misc]


def compare_types(ref: Run, first: tuple[str, Run], second: tuple[str, Run],
                  ndcg: tuple[Mapping[str, float], Mapping[str, float]] | None = None) -> TypeComparison:
    """Paired tests over the queries both runs hold: is ``second`` further from the reference than ``first``?"""
    d1, d2 = per_query_damage(ref, first[1]), per_query_damage(ref, second[1])
    queries = sorted(set(d1) & set(d2))
    diffs = np.array([[d2[q][i] - d1[q][i] for i in range(3)] for q in queries])
    out = TypeComparison(first[0], second[0],
                         st.mean_interval(diffs[:, 0]), st.paired_randomization_test(diffs[:, 0]),
                         st.mean_interval(diffs[:, 1]), st.paired_randomization_test(diffs[:, 1]),
                         st.mean_interval(diffs[:, 2]), st.paired_randomization_test(diffs[:, 2]))
    if ndcg is not None:
        common = sorted(set(ndcg[0]) & set(ndcg[1]))
        if common:
            d = np.array([ndcg[1][q] - ndcg[0][q] for q in common])
            out.ndcg10, out.ndcg10_p = st.mean_interval(d), st.paired_randomization_test(d)
    return out
