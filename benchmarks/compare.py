"""Compare run files against a reference run: scores, decisions, rankings, reasoning, cost, nDCG.

``compare(reference, runs, qrels=None, tokenize=None)`` returns one :class:`RunComparison` per run;
``render_markdown`` / ``to_json`` / ``plot`` turn them into the report that ``rank1-bench compare`` writes.
Rows present on only one side are counted and listed (first few), never silently dropped; every metric is
computed over the (qid, docid) pairs both files hold.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runfile import Key, Run
from rank1_local.core.errors import Rank1Error
from rank1_local.core.protocol import common_prefix_len

logger = logging.getLogger(__name__)
TOP_K = 10
SHOW_MISSING = 5


@dataclass
class RunComparison:
    name: str
    path: str
    common: int
    missing_in_run: int  # reference rows the run lacks
    extra_in_run: int  # run rows the reference lacks
    missing_examples: list[Key]
    extra_examples: list[Key]
    decision_agreement: float
    mean_abs_diff: float
    max_abs_diff: float
    pearson: float | None  # None when either side's scores are constant
    spearman: float | None
    kendall_tau: float | None  # mean over queries with >= 2 common documents and a defined tau
    top10_overlap: float | None  # mean over queries of |top-10 ∩ top-10| / min(10, docs)
    queries: int
    identical_reasoning: float
    median_divergence: float | None  # first position where differing chains diverge (unit below)
    divergence_unit: str  # "tokens" with a tokenizer, else "characters"
    mean_tokens_reference: float
    mean_tokens_run: float
    forced_reference: float
    forced_run: float
    ndcg10_reference: float | None = None
    ndcg10_run: float | None = None
    model_bytes: int | None = None
    pairs_per_second: float | None = None
    backend: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ndcg10_delta(self) -> float | None:
        if self.ndcg10_reference is None or self.ndcg10_run is None:
            return None
        return self.ndcg10_run - self.ndcg10_reference


def _defined(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    from scipy import stats

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    return _defined(stats.pearsonr(a, b)[0]), _defined(stats.spearmanr(a, b)[0])


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _ranking(ref: Run, run: Run, common: set[Key]) -> tuple[float | None, float | None, int]:
    from scipy import stats

    by_query: dict[str, list[str]] = {}
    for qid, docid in sorted(common):
        by_query.setdefault(qid, []).append(docid)
    taus, overlaps = [], []
    for qid, docids in by_query.items():
        a = np.array([ref.rows[(qid, d)].score for d in docids])
        b = np.array([run.rows[(qid, d)].score for d in docids])
        k = min(TOP_K, len(docids))
        top_a = {docids[i] for i in sorted(range(len(docids)), key=lambda i: (-a[i], docids[i]))[:k]}
        top_b = {docids[i] for i in sorted(range(len(docids)), key=lambda i: (-b[i], docids[i]))[:k]}
        overlaps.append(len(top_a & top_b) / k)
        if len(docids) >= 2:
            if np.array_equal(a, b):
                taus.append(1.0)
            else:
                tau = stats.kendalltau(a, b).statistic
                if np.isfinite(tau):
                    taus.append(float(tau))
    return _mean(taus), _mean(overlaps), len(by_query)


def _divergence(a: str, b: str, tokenize: Callable[[str], list[int]] | None) -> int:
    return common_prefix_len(tokenize(a), tokenize(b)) if tokenize else common_prefix_len(a, b)


def _ndcg(run: Run, common: set[Key], qrels: Sequence[Any]) -> float:
    import ir_measures
    from ir_measures import nDCG

    docs = [ir_measures.ScoredDoc(q, d, run.rows[(q, d)].score) for q, d in sorted(common)]
    judged = {q for q, _ in common}
    result = ir_measures.calc_aggregate([nDCG @ TOP_K], [r for r in qrels if r.query_id in judged], docs)
    return float(result[nDCG @ TOP_K])


def read_qrels(path: Path) -> list[Any]:
    """TREC qrels (``qid 0 docid rel``), read with ir-measures."""
    import ir_measures

    if not path.is_file():
        raise Rank1Error(f"{path}: no such qrels file")
    try:
        qrels = list(ir_measures.read_trec_qrels(str(path)))
    except Exception as exc:  # the reader's own parse errors
        raise Rank1Error(f"{path}: not a TREC qrels file (qid 0 docid rel): {exc}") from None
    if not qrels:
        raise Rank1Error(f"{path}: empty qrels file")
    return qrels


def compare_one(ref: Run, run: Run, *, qrels: Sequence[Any] | None = None,
                tokenize: Callable[[str], list[int]] | None = None) -> RunComparison:
    ref_keys, run_keys = set(ref.rows), set(run.rows)
    common = ref_keys & run_keys
    missing, extra = sorted(ref_keys - run_keys), sorted(run_keys - ref_keys)
    if missing or extra:
        logger.warning("%s: %d reference rows missing, %d rows not in the reference", run.name, len(missing),
                       len(extra))
    if not common:
        raise Rank1Error(f"{run.path} and {ref.path} have no (qid, docid) in common")
    keys = sorted(common)
    a = np.array([ref.rows[k].score for k in keys])
    b = np.array([run.rows[k].score for k in keys])
    diff = np.abs(a - b)
    pearson, spearman = _correlations(a, b)
    tau, overlap, n_queries = _ranking(ref, run, common)
    same = [ref.rows[k].reasoning == run.rows[k].reasoning for k in keys]
    divergences = [_divergence(ref.rows[k].reasoning, run.rows[k].reasoning, tokenize)
                   for k, s in zip(keys, same) if not s]
    header = run.header
    out = RunComparison(
        name=run.name, path=str(run.path), common=len(common), missing_in_run=len(missing), extra_in_run=len(extra),
        missing_examples=missing[:SHOW_MISSING], extra_examples=extra[:SHOW_MISSING],
        decision_agreement=float(np.mean((a > 0.5) == (b > 0.5))), mean_abs_diff=float(diff.mean()),
        max_abs_diff=float(diff.max()), pearson=pearson, spearman=spearman, kendall_tau=tau, top10_overlap=overlap,
        queries=n_queries, identical_reasoning=float(np.mean(same)),
        median_divergence=float(statistics.median(divergences)) if divergences else None,
        divergence_unit="tokens" if tokenize else "characters",
        mean_tokens_reference=float(np.mean([ref.rows[k].n_tokens for k in keys])),
        mean_tokens_run=float(np.mean([run.rows[k].n_tokens for k in keys])),
        forced_reference=float(np.mean([ref.rows[k].forced for k in keys])),
        forced_run=float(np.mean([run.rows[k].forced for k in keys])),
        model_bytes=header.model_bytes if header else None,
        pairs_per_second=header.pairs_per_second if header and header.seconds else None,
        backend=header.backend if header else None)
    if qrels is not None:
        out.ndcg10_reference = _ndcg(ref, common, qrels)
        out.ndcg10_run = _ndcg(run, common, qrels)
    return out


def compare(ref: Run, runs: Sequence[Run], *, qrels: Sequence[Any] | None = None,
            tokenize: Callable[[str], list[int]] | None = None) -> list[RunComparison]:
    return [compare_one(ref, run, qrels=qrels, tokenize=tokenize) for run in runs]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def summary_table(results: Sequence[RunComparison]) -> tuple[list[str], list[list[str]]]:
    """The comparison table's columns and rows, as compare.md and compare.html show them."""
    has_ndcg = any(r.ndcg10_run is not None for r in results)
    cols = ["run", "size MB", "pairs/s", "decision agr.", "mean |Δ|", "max |Δ|", "Pearson", "Spearman", "Kendall τ",
            "top-10 overlap", "same reasoning", "median divergence", "tokens (ref → run)", "forced (ref → run)"]
    if has_ndcg:
        cols += ["nDCG@10 ref", "nDCG@10 run", "ΔnDCG@10"]
    rows = []
    for r in results:
        cells = [r.name, _fmt(r.model_bytes / 1e6 if r.model_bytes else None, ".1f"), _fmt(r.pairs_per_second, ".2f"),
                 f"{r.decision_agreement:.1%}", f"{r.mean_abs_diff:.4f}", f"{r.max_abs_diff:.4f}", _fmt(r.pearson),
                 _fmt(r.spearman), _fmt(r.kendall_tau), _fmt(r.top10_overlap), f"{r.identical_reasoning:.1%}",
                 "–" if r.median_divergence is None else f"{r.median_divergence:g} {r.divergence_unit}",
                 f"{r.mean_tokens_reference:.1f} → {r.mean_tokens_run:.1f}",
                 f"{r.forced_reference:.1%} → {r.forced_run:.1%}"]
        if has_ndcg:
            delta = r.ndcg10_delta
            cells += [_fmt(r.ndcg10_reference, ".4f"), _fmt(r.ndcg10_run, ".4f"), _fmt(delta, "+.4f")]
        rows.append(cells)
    return cols, rows


def _one_side_only(results: Sequence[RunComparison]) -> list[str]:
    return [f"`{r.name}`: {r.missing_in_run} reference rows missing (e.g. {r.missing_examples}), {r.extra_in_run} rows "
            f"not in the reference (e.g. {r.extra_examples}); metrics use the {r.common} common rows."
            for r in results if r.missing_in_run or r.extra_in_run]


def render_markdown(ref: Run, results: Sequence[RunComparison]) -> str:
    lines = [f"# Runs compared with the reference `{ref.path.name}`", ""]
    if ref.header:
        h = ref.header
        lines += [f"Reference: {h.backend} ({h.device}), model `{h.model}`, settings {h.settings}.", ""]
    cols, rows = summary_table(results)
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    problems = _one_side_only(results)
    if problems:
        lines += ["", "## Rows on one side only", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def render_html(ref: Run, runs: Sequence[Run], results: Sequence[RunComparison], *, plot_png: bytes | None = None,
                tokenize: Callable[[str], list[int]] | None = None) -> str:
    """compare.html: what produced each run, the table, the plot and every run's pairs against the reference."""
    from benchmarks.html_report import PairSet, Plot, Section, Table, fixture_name, render_page
    from benchmarks.pair_views import pair_views

    def produced(run: Run) -> str:
        h = run.header
        if h is None:
            return f"{run.path.name}: no header (model and settings unknown)"
        budget = h.settings.get("max_think_tokens", "?")
        return (f"{h.model} on {h.backend} ({h.device}); protocol {h.settings.get('protocol', '?')}, reasoning "
                f"budget {budget} tokens, context {h.settings.get('n_ctx', '?')}")

    facts = [("Reference", f"{ref.name}: {produced(ref)}")] + [(r.name, produced(r)) for r in runs]
    cols, rows = summary_table(results)
    title = f"Runs compared with the reference {ref.path.name}"
    models = [run.header.model for run in (ref, *runs) if run.header is not None]
    section = Section(title, facts, _one_side_only(results), [Table("Against the reference", cols, rows)],
                      [Plot("Scores against the reference; agreement by size", plot_png)] if plot_png else [],
                      PairSet(ref.name, {r.name: pair_views(ref, run, tokenize) for r, run in zip(results, runs)},
                              results[0].divergence_unit if results else "characters"),
                      fixture=any(fixture_name(m) for m in models))
    return render_page(title, [section])


def to_json(ref: Run, results: Sequence[RunComparison]) -> dict[str, Any]:
    rows = []
    for r in results:
        row = asdict(r)
        row["ndcg10_delta"] = r.ndcg10_delta
        rows.append(row)
    return {"reference": str(ref.path), "reference_header": ref.header.to_json() if ref.header else None,
            "runs": rows}


def plot(ref: Run, runs: Sequence[Run], results: Sequence[RunComparison], path: Path) -> None:
    """Left: each run's scores against the reference's. Right: decision agreement and Kendall τ by size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for run, res in zip(runs, results):
        keys = sorted(set(ref.rows) & set(run.rows))
        left.scatter([ref.rows[k].score for k in keys], [run.rows[k].score for k in keys], s=12, alpha=0.6,
                     label=res.name)
    left.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    left.set_xlabel(f"reference score ({ref.name})")
    left.set_ylabel("run score")
    left.set_title("Scores against the reference")
    left.legend(fontsize=7, loc="upper left")
    xs = [(r.model_bytes or 0) / 1e6 for r in results]
    sized = any(xs)
    positions = xs if sized else list(range(len(results)))
    right.plot(positions, [r.decision_agreement for r in results], "o", label="decision agreement")
    right.plot(positions, [r.kendall_tau if r.kendall_tau is not None else np.nan for r in results], "s",
               label="Kendall τ (mean per query)")
    for x, r in zip(positions, results):
        right.annotate(r.name, (x, r.decision_agreement), fontsize=7, rotation=30, xytext=(3, 3),
                       textcoords="offset points")
    right.set_xlabel("model size (MB)" if sized else "run")
    right.set_ylim(min(0.0, *[r.decision_agreement for r in results]) - 0.02, 1.05)
    right.set_title("Agreement with the reference")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    from rank1_local.runs.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
