"""A study's report: the analysis of every run (:func:`analyse_study`), then ``study.md``, ``study.json``,
``study.png`` and ``study.html`` (:func:`write_report`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.html_report import PairSet, Plot, Section, Table, fixture_name, render_page
from benchmarks.pair_views import pair_views
from benchmarks.study import statistics as st
from benchmarks.study.analysis import (
    RankingQuality,
    RunCost,
    TypeComparison,
    TypeResult,
    analyse_run,
    common_keys,
    compare_types,
    ranking_quality,
)
from benchmarks.study.exports import IMATRIX_SUFFIX
from benchmarks.study.inputs import StudyInputs, read_qrels
from benchmarks.study.study import StudyRuns, StudySettings, machine, run_cost
from rank1_local.core.pairs import passage_text
from rank1_local.runs.atomic import atomic_path, write_text_atomic

METHODS = (
    "**Statistics.** A flip is a pair whose decision (score > 0.5) differs from the reference's. KL is KL(reference "
    "‖ run) of the (true, false) distribution per pair, in nats (scores clipped to [1e-6, 1 − 1e-6]). Intervals are "
    f"{st.LEVEL:.0%} percentile intervals from a cluster bootstrap over queries ({st.BOOTSTRAP} resamples, fixed "
    "seed; Wilson's interval over pairs when a proportion is 0 or 1). ΔnDCG@10 and the type-against-type "
    "differences are tested with a two-sided paired randomization (sign-flip) test over queries (exact up to "
    f"{st.EXACT_MAX} differing queries, else {st.PERMUTATIONS} random sign patterns). Multiple comparisons: the "
    "p-values shown are Holm-adjusted within each family of tests — ΔnDCG@10 of every type against the reference; "
    "each statistic over the rows of a type-against-type table — which keeps each family's chance of any false "
    "positive at the level the reader tests at (without assuming the tests independent); the raw p-values are in "
    "study.json. nDCG@10 follows trec_eval (linear gains, ties broken by document id); which "
    "queries its mean holds is said above its table. Spearman and Kendall τ "
    "(tau-b) are computed per query and averaged. Reasoning divergence is the first token where a chain differs "
    "from the reference's."
)


@dataclass
class ReferenceSummary:
    name: str
    backend: str | None
    device: str | None
    cost: RunCost
    quality: RankingQuality | None
    forced: st.Estimate
    tokens: float


@dataclass
class StudyReport:
    title: str
    note: str | None
    source: str
    model: str
    pairs: int
    queries: int
    judged_queries: int | None
    dataset: str | None
    settings: dict[str, Any]
    machine: str
    reference: ReferenceSummary
    types: list[TypeResult]
    order: list[TypeComparison] = field(default_factory=list)
    imatrix: list[TypeComparison] = field(default_factory=list)
    seconds: float | None = None
    pair_set: PairSet | None = field(default=None, repr=False)  # each run's pairs, for study.html (not study.json)

    def to_json(self) -> dict[str, Any]:
        out = asdict(replace(self, pair_set=None)) | {"methods": METHODS}
        del out["pair_set"]
        return out


def analyse_study(runs: StudyRuns, inputs: StudyInputs, settings: StudySettings,
                  tokenize: Callable[[str], list[int]] | None = None) -> StudyReport:
    """Read every run file and compute the report (pure arithmetic on the files: cheap, redone every time).
    ``tokenize`` measures where chains diverge (None: the vocabulary of a GGUF export, else the source's)."""
    from benchmarks.runfile import read_run

    ref = read_run(runs.reference)
    qrels = read_qrels(runs.qrels_file) if runs.qrels_file else None
    tokenize = tokenize or _tokenizer(runs)
    depth = max(sum(1 for k in ref.rows if k[0] == q) for q in {k[0] for k in ref.rows})
    recall_k = tuple(k for k in settings.recall_k if k < depth)
    loaded = {label: read_run(path) for label, path in runs.runs.items()}
    drop = settings.drop_queries_without_relevant
    results = [analyse_run(label, ref, run, qrels=qrels, recall_k=recall_k, tokenize=tokenize,
                           cost=run_cost(runs.runs[label], runs.exports[label]), drop_without_relevant=drop)
               for label, run in loaded.items()]
    adjust_types(results)
    keys = common_keys(ref, ref)
    groups = np.array([q for q, _ in keys])
    reference = ReferenceSummary(
        runs.reference.name.removesuffix(".jsonl"), None, None, run_cost(runs.reference, runs.source),
        ranking_quality(ref, keys, qrels, recall_k, drop_without_relevant=drop) if qrels else None,
        st.cluster_proportion(np.array([ref.rows[k].forced for k in keys]), groups),
        float(np.mean([ref.rows[k].n_tokens for k in keys])))
    reference.backend, reference.device = reference.cost.backend, reference.cost.device
    ndcg = {r.label: r.quality.per_query_ndcg10 for r in results if r.quality is not None}

    def comparison(a: str, b: str) -> TypeComparison:
        pair = (ndcg[a], ndcg[b]) if a in ndcg and b in ndcg else None
        return compare_types(ref, (a, loaded[a]), (b, loaded[b]), pair)

    plain_gguf = {t.label for t in settings.types if t.is_gguf and not t.imatrix}
    sized = sorted((r for r in results if r.label in plain_gguf), key=lambda r: (-(r.cost.model_bytes or 0), r.label))
    order = [comparison(a.label, b.label) for a, b in zip(sized, sized[1:])]
    labels = set(loaded)
    imatrix = [comparison(label.removesuffix(IMATRIX_SUFFIX), label) for label in loaded
               if label.endswith(IMATRIX_SUFFIX) and label.removesuffix(IMATRIX_SUFFIX) in labels]
    for family in (order, imatrix):
        adjust_family(family)
    judged = reference.quality.queries if reference.quality else None
    pair_set = PairSet(reference.name, {label: pair_views(ref, run, tokenize) for label, run in loaded.items()},
                       "tokens" if tokenize else "characters", {p.qid: p.query for p in inputs.pairs},
                       {(p.qid, p.docid): passage_text(p.passage) for p in inputs.pairs})
    return StudyReport(settings.title, settings.note, inputs.source, str(settings.model), len(ref.rows),
                       len(set(groups)), judged, inputs.dataset, settings.config.to_dict(), machine(), reference,
                       results, order, imatrix, runs.seconds, pair_set)


def report_from_json(data: dict[str, Any]) -> StudyReport:
    """A :class:`StudyReport` read back from its ``study.json`` (without its pairs: study.json does not hold them)."""
    def estimate(value: Any) -> st.Estimate | None:
        return None if value is None else st.Estimate(value["value"], value["low"], value["high"])

    def quality(value: Any) -> RankingQuality | None:
        if value is None:
            return None
        return RankingQuality(value["queries"], value["ndcg10"], {int(k): v for k, v in value["recall"].items()},
                              value["per_query_ndcg10"], value.get("without_relevant", 0), value.get("dropped", False))

    def built(cls: type, value: dict[str, Any], **converted: Any) -> Any:
        names = {f.name for f in fields(cls)}
        return cls(**({k: v for k, v in value.items() if k in names} | converted))

    def type_result(value: dict[str, Any]) -> TypeResult:
        estimates = {k: estimate(value[k]) for k in ("flips", "kl_mean", "abs_diff_mean", "spearman", "kendall",
                                                    "identical_chains", "tokens_ratio", "forced", "ndcg10_delta")}
        return built(TypeResult, value, cost=RunCost(**value["cost"]), quality=quality(value["quality"]),
                     **estimates)

    def comparison(value: dict[str, Any]) -> TypeComparison:
        return built(TypeComparison, value, **{k: estimate(value[k]) for k in ("flip_rate", "kl", "abs_diff",
                                                                               "ndcg10")})

    ref = data["reference"]
    reference = built(ReferenceSummary, ref, cost=RunCost(**ref["cost"]), quality=quality(ref["quality"]),
                      forced=estimate(ref["forced"]))
    report = built(StudyReport, data, reference=reference, types=[type_result(t) for t in data["types"]],
                   order=[comparison(c) for c in data["order"]], imatrix=[comparison(c) for c in data["imatrix"]])
    adjust_types(report.types)  # the adjusted p-values follow from the raw ones the JSON keeps
    for family in (report.order, report.imatrix):
        adjust_family(family)
    return report


COMPARISON_TESTS = ("flip_p", "kl_p", "abs_diff_p", "ndcg10_p")


def adjust_types(results: Sequence[TypeResult]) -> None:
    """Holm-adjust the ΔnDCG@10 p-values over the study's types (one family)."""
    for r, adjusted in zip(results, st.holm([r.ndcg10_p for r in results]), strict=True):
        r.ndcg10_p_holm = adjusted


def adjust_family(comparisons: Sequence[TypeComparison]) -> None:
    """Holm-adjust each statistic's p-values over the rows of one type-against-type table (one family each)."""
    for name in COMPARISON_TESTS:
        for c, adjusted in zip(comparisons, st.holm([getattr(c, name) for c in comparisons]), strict=True):
            c.holm[name] = adjusted


def _tokenizer(runs: StudyRuns) -> Any:
    """Token ids for reasoning divergence: the vocabulary of a GGUF export (torch-free), else the source's."""
    from benchmarks.cli import load_tokenizer

    ggufs = [p for p in runs.exports.values() if p.suffix == ".gguf"]
    return load_tokenizer(str(ggufs[0] if ggufs else runs.source))


# --- Markdown --------------------------------------------------------------------------------------------------------

def _num(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _est(e: st.Estimate | None, spec: str, scale: float = 1.0) -> str:
    if e is None or math.isnan(e.value):
        return "–"
    text = format(e.value * scale, spec)
    if e.low is not None and e.high is not None:
        text += f" [{format(e.low * scale, spec)}, {format(e.high * scale, spec)}]"
    return text


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def _mb(n: int | None) -> str:
    return "–" if not n else f"{n / 1e6:.1f}"


def _table(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _queries_in_the_mean(quality: RankingQuality) -> str:
    """Which queries nDCG@10 and Recall@k average over (trec_eval's convention, or the flag's)."""
    n = quality.without_relevant
    if quality.dropped:
        return (f"Means over the {quality.queries} judged queries with a relevant document: {n} judged "
                "quer" + ("y" if n == 1 else "ies") + " without one left out (--drop-queries-without-relevant; "
                "trec_eval would count them 0).")
    return (f"Means over all {quality.queries} judged queries, as trec_eval computes them: the {n} without a "
            "relevant document count 0 (--drop-queries-without-relevant leaves them out).")


def summary_tables(report: StudyReport) -> list[Table]:
    """The report's tables, as study.md and study.html show them."""
    ref = report.reference
    tables = [Table("Decisions and scores against the reference", [
        "type", "size MB", "flips % [95% CI]", "queries with a flip", "KL mean [95% CI]", "KL median", "KL p99",
        "mean |Δscore| [95% CI]", "max |Δscore|", "Spearman", "Kendall τ"],
        [[r.label, _mb(r.cost.model_bytes), _est(r.flips, ".1f", 100) + f" ({r.flip_count})",
          f"{r.queries_with_flip}/{r.queries}", _est(r.kl_mean, ".2e"), _num(r.kl_median, ".2e"),
          _num(r.kl_p99, ".2e"), _est(r.abs_diff_mean, ".4f"), _num(r.abs_diff_max, ".3f"),
          _num(r.spearman.value, ".3f"), _num(r.kendall.value, ".3f")] for r in report.types])]
    if ref.quality is not None:
        ks = sorted(ref.quality.recall)
        rows = [[f"reference ({ref.name})", _num(ref.quality.ndcg10, ".4f"), "", ""]
                + [_num(ref.quality.recall.get(k), ".4f") for k in ks]]
        for r in report.types:
            q = r.quality
            rows.append([r.label, _num(q.ndcg10 if q else None, ".4f"), _est(r.ndcg10_delta, "+.4f"),
                         _p(r.ndcg10_p_holm)] + [_num(q.recall.get(k) if q else None, ".4f") for k in ks])
        tables.append(Table(f"Ranking quality against the qrels ({ref.quality.queries} queries)",
                            ["run", "nDCG@10", "ΔnDCG@10 [95% CI]", "p (paired randomization, Holm)"]
                            + [f"Recall@{k}" for k in ks], rows, _queries_in_the_mean(ref.quality)))
    rows = [[f"reference ({ref.name})", _mb(ref.cost.model_bytes), "", "", f"{ref.tokens:.1f}", "",
             _est(ref.forced, ".1f", 100), _num(ref.cost.pairs_per_second, ".2f"), _mb(ref.cost.peak_rss_bytes)]]
    for r in report.types:
        rows.append([r.label, _mb(r.cost.model_bytes), _est(r.identical_chains, ".1f", 100),
                     "–" if r.median_divergence is None else f"{r.median_divergence:g} {r.divergence_unit}",
                     f"{r.tokens_run:.1f}", _est(r.tokens_ratio, ".3f"), _est(r.forced, ".1f", 100),
                     _num(r.cost.pairs_per_second, ".2f"), _mb(r.cost.peak_rss_bytes)])
    tables.append(Table("Reasoning and cost", [
        "run", "size MB", "identical chains % [95% CI]", "median divergence", "tokens/pair",
        "tokens vs reference [95% CI]", "forced % [95% CI]", "pairs/s", "peak RSS MB"], rows))
    for title, comparisons, intro in (
            ("Order of damage", report.order, "Each GGUF type (without an importance matrix) against the next larger "
             "one: per-query differences (smaller − larger) of the flip rate, the mean KL and the mean |Δscore| "
             "against the reference; a positive difference with a small p means the smaller type damages more."),
            ("Importance matrix", report.imatrix, "Each type with the rank1 importance matrix against the same type "
             "without: per-query differences (with − without); negative means the importance matrix helps.")):
        if comparisons:
            tables.append(Table(title, [
                "first → second", "Δ flip rate % [95% CI]", "p (Holm)", "Δ mean KL [95% CI]", "p (Holm)",
                "Δ mean |Δscore| [95% CI]", "p (Holm)", "ΔnDCG@10", "p (Holm)"],
                [[f"{c.first} → {c.second}", _est(c.flip_rate, "+.2f", 100), _p(c.holm.get("flip_p")),
                  _est(c.kl, "+.2e"), _p(c.holm.get("kl_p")), _est(c.abs_diff, "+.4f"),
                  _p(c.holm.get("abs_diff_p")), _est(c.ndcg10, "+.4f"), _p(c.holm.get("ndcg10_p"))]
                 for c in comparisons], intro))
    return tables


def _prompt_words(report: StudyReport) -> str:
    s = report.settings
    return f"the official dataset prompt of {report.dataset}" if s.get("prompt_template") and report.dataset \
        else "a dataset prompt" if s.get("prompt_template") else "no dataset prompt"


def _closing_notes(report: StudyReport) -> list[str]:
    notes = []
    missing = [r for r in report.types if r.missing]
    if missing:
        notes.append("Rows missing from a run (statistics use the pairs both hold): "
                     + ", ".join(f"{r.label} {r.missing}" for r in missing) + ".")
    if report.seconds is not None:
        notes.append(f"This invocation took {report.seconds / 60:.1f} minutes (exports and scoring it had to do).")
    return notes


def render_markdown(report: StudyReport, plot_name: str | None = "study.png") -> str:
    ref = report.reference
    s = report.settings
    lines = [f"# {report.title}", ""]
    if report.note:
        lines += [report.note, ""]
    judged = f", {report.judged_queries} of them in the nDCG@10 mean" if report.judged_queries else \
        ", no qrels" if report.judged_queries is None else ""
    lines += [
        f"Model `{report.model}`; {report.pairs} pairs over {report.queries} queries{judged} ({report.source}). "
        f"Protocol {s['protocol']}, reasoning budget {s['max_think_tokens']} tokens, context {s['n_ctx']}, "
        f"{_prompt_words(report)}. Reference: {ref.backend} ({ref.device}). Machine: {report.machine}.", "",
        METHODS, ""]
    if plot_name:
        lines += [f"![size against ΔnDCG@10 and flip rate]({plot_name})", ""]
    for table in summary_tables(report):
        if lines[-1] != "":
            lines.append("")
        lines += [f"## {table.heading}", ""]
        if table.intro:
            lines += [table.intro, ""]
        lines += _table(table.columns, table.rows)
    for note in _closing_notes(report):
        lines += ["", note]
    return "\n".join(lines) + "\n"


# --- HTML ------------------------------------------------------------------------------------------------------------

def html_section(report: StudyReport, plot_png: bytes | None) -> Section:
    """The study as a section of study.html: what produced it, the tables, the plot and its pairs."""
    ref = report.reference
    s = report.settings
    judged = f"{report.judged_queries} with a relevant document in the qrels" if report.judged_queries else \
        "no qrels" if report.judged_queries is None else "none with a relevant document"
    facts = [("Model", report.model), ("Types", ", ".join(r.label for r in report.types)),
             ("Reference", f"{ref.name}: {ref.backend} ({ref.device})"),
             ("Protocol", f"{s['protocol']}, reasoning budget {s['max_think_tokens']} tokens, context {s['n_ctx']}, "
                          f"{s.get('rethink_rounds', 0)} rethink rounds, {_prompt_words(report)}"),
             ("Pairs", f"{report.pairs} over {report.queries} queries, {judged} ({report.source})"),
             ("Machine", report.machine)]
    notes = ([report.note] if report.note else []) + [METHODS] + _closing_notes(report)
    if report.pair_set is None:
        notes.append("No pairs here: this page was made from the study's JSON, which keeps the statistics but not "
                     "the runs' pairs; the study writes its study.html with every run's pairs.")
    plots = [Plot("Export size against ΔnDCG@10 and against the flip rate, with 95% intervals", plot_png)] \
        if plot_png else []
    return Section(report.title, facts, notes, summary_tables(report), plots, report.pair_set,
                   fixture=fixture_name(report.model) is not None)


# --- plot ------------------------------------------------------------------------------------------------------------

def plot(report: StudyReport, path: Path) -> None:
    """Size against ΔnDCG@10 (with its interval) and against the flip rate (with its interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ndcg = any(r.ndcg10_delta is not None for r in report.types)
    panels = 2 if has_ndcg else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels + 1.8, 4.5), squeeze=False)
    xs = [(r.cost.model_bytes or 0) / 1e6 for r in report.types]
    colours = plt.get_cmap("tab20")

    def draw(ax: Any, values: list[st.Estimate | None], scale: float, ylabel: str, title: str) -> None:
        for i, (x, r, e) in enumerate(zip(xs, report.types, values)):
            if e is None or math.isnan(e.value):
                continue
            low = max(0.0, e.value - e.low) if e.low is not None else 0.0  # a percentile interval may sit beside
            high = max(0.0, e.high - e.value) if e.high is not None else 0.0  # the point estimate
            marker = "s" if r.label.endswith(IMATRIX_SUFFIX) else "o"
            ax.errorbar([x], [e.value * scale], yerr=[[low * scale], [high * scale]], fmt=marker, capsize=3,
                        color=colours(i % 20), label=r.label, alpha=0.85)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("export size (MB)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)

    column = 0
    if has_ndcg:
        draw(axes[0][0], [r.ndcg10_delta for r in report.types], 1.0, "ΔnDCG@10 (run − reference)",
             "ΔnDCG@10 with 95% CI")
        column = 1
    draw(axes[0][column], [r.flips for r in report.types], 100.0, "flip rate against the reference (%)",
         "Decision flips with 95% CI")
    handles, labels = axes[0][column].get_legend_handles_labels()  # every type has a flip rate
    fig.legend(handles, labels, loc="center right", fontsize=8, title="type (■ with imatrix)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / (5.5 * panels + 1.8), 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: StudyReport, out: Path, *, stem: str = "study") -> list[Path]:
    """``STEM.md``, ``STEM.json``, ``STEM.png`` and ``STEM.html`` (the page with the pairs) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js, png, page = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}.html"
    plot(report, png)
    write_text_atomic(md, render_markdown(report, png.name))
    write_text_atomic(js, json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")
    write_text_atomic(page, render_page(report.title, [html_section(report, png.read_bytes())]))
    return [md, js, png, page]
