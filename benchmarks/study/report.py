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
from benchmarks.study.operating_points import (
    ALPHA,
    OperatingPoints,
    TypeRuns,
    analyse_points,
    choose,
    points_from_json,
)
from benchmarks.study.study import StudyRuns, StudySettings, machine, run_cost
from rank1_local.core.cards import RANK1, ModelCard, card_named
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
    points: OperatingPoints | None = None  # --budgets, --prefilter, --target-latency: the operating points

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
    points = operating_points(runs, settings, ref, loaded, qrels) if sweeps(settings) else None
    pair_set = PairSet(reference.name, {label: pair_views(ref, run, tokenize) for label, run in loaded.items()},
                       "tokens" if tokenize else "characters", {p.qid: p.query for p in inputs.pairs},
                       {(p.qid, p.docid): passage_text(p.passage) for p in inputs.pairs})
    return StudyReport(settings.title, settings.note, inputs.source, str(settings.model), len(ref.rows),
                       len(set(groups)), judged, inputs.dataset, settings.scoring_settings, machine(), reference,
                       results, order, imatrix, runs.seconds, pair_set, points)


def sweeps(settings: StudySettings) -> bool:
    """Whether the study maps operating points (several budgets, a prefilter, or a latency target)."""
    sweep = settings.sweep
    return len(settings.budgets) > 1 or sweep.prefilter is not None or sweep.target_latency is not None


def operating_points(runs: StudyRuns, settings: StudySettings, ref: Any, loaded: dict[str, Any],
                     qrels: Any) -> OperatingPoints:
    """Every (type, budget, prefilter cut) point from the run files (:mod:`benchmarks.study.operating_points`)."""
    from benchmarks.runfile import read_run
    from benchmarks.study.scoring import read_job_record
    from rank1_local.runs.inputs import read_pairs
    from rank1_local.runs.run_header import header_path, read_header

    def seconds(path: Path) -> float | None:
        header = read_header(header_path(path))
        return header.seconds if header is not None and header.seconds else None

    def peak(*paths: Path) -> int | None:
        values = [read_job_record(p).get("peak_rss_bytes") for p in paths]
        return max((v for v in values if v), default=None)

    types = []
    for label, path in runs.runs.items():
        calibration = runs.calibration.get(label)
        files = [path, *([calibration] if calibration else [])]
        types.append(TypeRuns(label, loaded[label], read_run(calibration) if calibration else None,
                              {p.name: seconds(p) for p in files}, peak(*files)))
    prefilter = read_run(runs.prefilter) if runs.prefilter is not None else None
    order = {(r.qid, r.docid): i for i, r in enumerate(read_pairs(runs.pairs_file))}
    sweep = settings.sweep
    return analyse_points(
        ref, types, settings.budgets, qrels=qrels, order=order, prefilter=prefilter, prefilter_name=sweep.prefilter,
        prefilter_seconds=seconds(runs.prefilter) if runs.prefilter is not None else None,
        prefilter_peak=peak(runs.prefilter) if runs.prefilter is not None else None, keeps=sweep.keeps,
        target_latency=sweep.target_latency, drop_without_relevant=settings.drop_queries_without_relevant)


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
    points = points_from_json(data["points"]) if data.get("points") else None
    if points is not None and points.target is not None:  # the target's tests follow from the per-query values
        points.target = choose(points.points, points.target.seconds)
    report = built(StudyReport, data, reference=reference, types=[type_result(t) for t in data["types"]],
                   order=[comparison(c) for c in data["order"]], imatrix=[comparison(c) for c in data["imatrix"]],
                   points=points)
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
    card = _card(report)
    if card.reasons:
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
    else:  # no chains, no generated tokens: the cost alone
        tables.append(Table("Cost", ["run", "size MB", "pairs/s", "peak RSS MB"], [
            [name, _mb(cost.model_bytes), _num(cost.pairs_per_second, ".2f"), _mb(cost.peak_rss_bytes)]
            for name, cost in [(f"reference ({ref.name})", ref.cost)] + [(r.label, r.cost) for r in report.types]]))
    if report.points is not None:
        tables.append(points_table(report))
    for title, comparisons, intro in (
            ("Order of damage", report.order, "Each GGUF type (without an importance matrix) against the next larger "
             "one: per-query differences (smaller − larger) of the flip rate, the mean KL and the mean |Δscore| "
             "against the reference; a positive difference with a small p means the smaller type damages more."),
            ("Importance matrix", report.imatrix, f"Each type with the {card.name} importance matrix against the same "
             "type without: per-query differences (with − without); negative means the importance matrix helps.")):
        if comparisons:
            tables.append(Table(title, [
                "first → second", "Δ flip rate % [95% CI]", "p (Holm)", "Δ mean KL [95% CI]", "p (Holm)",
                "Δ mean |Δscore| [95% CI]", "p (Holm)", "ΔnDCG@10", "p (Holm)"],
                [[f"{c.first} → {c.second}", _est(c.flip_rate, "+.2f", 100), _p(c.holm.get("flip_p")),
                  _est(c.kl, "+.2e"), _p(c.holm.get("kl_p")), _est(c.abs_diff, "+.4f"),
                  _p(c.holm.get("abs_diff_p")), _est(c.ndcg10, "+.4f"), _p(c.holm.get("ndcg10_p"))]
                 for c in comparisons], intro))
    return tables


POINTS_INTRO = (
    "Every (type, reasoning budget, prefilter cut) on these pairs and this machine. Budgets below the largest are "
    "derived from the type's one generation (a chain that closed within the budget gives the same result; one that "
    "did not is cut there and answered as a run with that budget would: tests/test_budgets.py checks this against "
    "direct runs). A cascade point takes rank1's results on the prefilter's best N per query and the prefilter's "
    "below them, in its order (what rerank --prefilter gives: tests/test_cascade.py). nDCG@10 with its 95% bootstrap "
    "interval over queries; flips against the reference among the pairs rank1 judged at that point. Seconds per "
    "query: *measured* for each type's one point scored directly (its scoring time over the queries), *derived* for "
    "the others from their token counts as a × prompt tokens + b × (generated tokens + forced answers), a and b this "
    "type's costs solved from its two runs on this machine (below), plus the prefilter's measured time for a cascade "
    "point. Peak memory: the peak resident memory of the type's scoring processes (a cascade: plus the "
    "prefilter's, as both are loaded). ★ marks the Pareto frontier (no other point is as fast and as good with one "
    "of them better).")


def points_table(report: StudyReport) -> Table:
    points = report.points
    assert points is not None
    rows = []
    for p in sorted(points.points, key=lambda p: (p.type, p.keep or 0, p.budget)):
        rows.append([p.type, str(p.budget), "all" if p.keep is None else str(p.keep), _est(p.ndcg10, ".4f"),
                     _est(p.flips, ".1f", 100) + f" ({p.flip_count}/{p.judged})",
                     _num(p.seconds_per_query, ".3f"), p.timing, _mb(p.peak_rss_bytes), "★" if p.frontier else ""])
    return Table("Operating points", ["type", "budget", "prefilter keeps", "nDCG@10 [95% CI]",
                                      "flips % [95% CI] (count/judged)", "s/query", "time", "peak RSS MB",
                                      "frontier"], rows, POINTS_INTRO)


def points_notes(report: StudyReport) -> list[str]:
    """What the operating points rest on (the time model, the derivation check) and the target's answer."""
    points = report.points
    if points is None:
        return []
    notes = []
    for label, model in points.time_models.items():
        runs = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in model.measured.items())
        notes.append(f"Time model of {label}: a = {model.prompt * 1e3:.3f} ms per prompt token, b = "
                     f"{model.step * 1e3:.3f} ms per generated token (from {runs}).")
    if points.prefilter is not None:
        notes.append(f"Prefilter {points.prefilter}: {_num(points.prefilter_seconds, '.1f')} s over every pair, peak "
                     f"RSS {_mb(points.prefilter_peak_rss_bytes)} MB.")
    for c in points.checks:
        notes.append(f"Derived against direct at budget {c.budget} ({c.type}): the same chain, token count and forced "
                     f"flag for {c.same_text} of {c.pairs} pairs, largest |Δscore| {c.max_abs_diff:.2e}.")
    target = points.target
    if target is not None:
        if target.best is None:
            notes.append(f"**Target {target.seconds:g} s per query**: no point is that fast here"
                         + (f"; the fastest is {target.fastest}." if target.fastest else "."))
        else:
            best = next(p for p in points.points if p.name == target.best)
            tied = "; ".join(f"{name} (ΔnDCG@10 {target.tests[name]['delta']:+.4f}, p = {_p(target.tests[name]['p'])})"
                             for name in target.tied) or "none"
            notes.append(f"**Target {target.seconds:g} s per query**: the best point is **{target.best}** (nDCG@10 "
                         f"{_est(best.ndcg10, '.4f')}, {_num(best.seconds_per_query, '.3f')} s per query, "
                         f"{best.timing}). Within the target, a paired randomization test over queries "
                         f"(p ≥ {ALPHA:g}, each test on its own) cannot tell these apart from it: {tied}.")
    return notes


def _card(report: StudyReport) -> ModelCard:
    """The model card the study scored under (rank1's settings name none)."""
    return card_named(report.settings.get("card", RANK1.name))


def _protocol_words(report: StudyReport) -> str:
    """How pairs were scored: rank1's protocol and reasoning budget, or a card that answers at once."""
    s, card = report.settings, _card(report)
    if not card.reasons:
        return (f"Model card {card.name} (no reasoning: the answer is read at the last prompt position), context "
                f"{s['n_ctx']}")
    return f"Protocol {s['protocol']}, reasoning budget {_budget_words(s)}, context {s['n_ctx']}"


def _budget_words(settings: dict[str, Any]) -> str:
    derived = settings.get("derive_budgets") or []
    if not derived:
        return f"{settings['max_think_tokens']} tokens"
    return (f"{settings['max_think_tokens']} tokens (the tables of types; the operating points also at "
            f"{', '.join(map(str, derived))}, derived from it)")


def _prompt_words(report: StudyReport) -> str:
    s = report.settings
    return f"the official dataset prompt of {report.dataset}" if s.get("prompt_template") and report.dataset \
        else "a dataset prompt" if s.get("prompt_template") else "no dataset prompt"


def _closing_notes(report: StudyReport) -> list[str]:
    notes = points_notes(report)
    missing = [r for r in report.types if r.missing]
    if missing:
        notes.append("Rows missing from a run (statistics use the pairs both hold): "
                     + ", ".join(f"{r.label} {r.missing}" for r in missing) + ".")
    if report.seconds is not None:
        notes.append(f"This invocation took {report.seconds / 60:.1f} minutes (exports and scoring it had to do).")
    return notes


def render_markdown(report: StudyReport, plot_name: str | None = "study.png") -> str:
    ref = report.reference
    lines = [f"# {report.title}", ""]
    if report.note:
        lines += [report.note, ""]
    judged = f", {report.judged_queries} of them in the nDCG@10 mean" if report.judged_queries else \
        ", no qrels" if report.judged_queries is None else ""
    lines += [
        f"Model `{report.model}`; {report.pairs} pairs over {report.queries} queries{judged} ({report.source}). "
        f"{_protocol_words(report)}, {_prompt_words(report)}. Reference: {ref.backend} ({ref.device}). Machine: "
        f"{report.machine}.", "",
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
    scoring = (("Protocol", f"{s['protocol']}, reasoning budget {_budget_words(s)}, context {s['n_ctx']}, "
                            f"{s.get('rethink_rounds', 0)} rethink rounds, {_prompt_words(report)}")
               if _card(report).reasons else ("Scoring", f"{_protocol_words(report)}, {_prompt_words(report)}"))
    facts = [("Model", report.model), ("Types", ", ".join(r.label for r in report.types)),
             ("Reference", f"{ref.name}: {ref.backend} ({ref.device})"), scoring,
             ("Pairs", f"{report.pairs} over {report.queries} queries, {judged} ({report.source})"),
             ("Machine", report.machine)]
    notes = ([report.note] if report.note else []) + [METHODS] + _closing_notes(report)
    if report.pair_set is None:
        notes.append("No pairs here: this page was made from the study's JSON, which keeps the statistics but not "
                     "the runs' pairs; the study writes its study.html with every run's pairs.")
    caption = "Export size against ΔnDCG@10 and against the flip rate, with 95% intervals" + (
        "; below, the operating points' time against nDCG@10 and their Pareto frontier" if report.points else "")
    plots = [Plot(caption, plot_png)] if plot_png else []
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
    frontier = report.points is not None and any(p.ndcg10 is not None and p.seconds_per_query is not None
                                                 for p in report.points.points)
    width = 5.5 * panels + 1.8
    fig = plt.figure(figsize=(width, 4.5 + (5.0 if frontier else 0.0)))
    grid = fig.add_gridspec(2 if frontier else 1, panels, height_ratios=(4.5, 5.0) if frontier else None)
    axes = [[fig.add_subplot(grid[0, i]) for i in range(panels)]]
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
    top = 4.5 / 9.5 if frontier else 1.0  # the share of the figure's height the top row takes
    fig.legend(handles, labels, loc="center right", fontsize=8, title="type (■ with imatrix)", title_fontsize=8,
               bbox_to_anchor=(1.0, 1 - top / 2))
    if frontier:
        draw_frontier(fig.add_subplot(grid[1, :]), report)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / width, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def draw_frontier(ax: Any, report: StudyReport) -> None:
    """Seconds per query against nDCG@10 (with its interval) for every operating point: the Pareto frontier in colour,
    joined; the points it drops in grey; the latency target and its best point marked."""
    points = report.points
    assert points is not None
    rated = [p for p in points.points if p.ndcg10 is not None and p.seconds_per_query is not None]
    markers = {label: m for label, m in zip(dict.fromkeys(p.type for p in points.points), "osD^v<>ph*")}
    colours = {None: "tab:blue", **{k: c for k, c in zip(sorted({p.keep for p in rated if p.keep}),
                                                          ("tab:orange", "tab:green", "tab:red", "tab:purple"))}}
    names: dict[tuple[float, float], list[str]] = {}  # frontier points at the same place share one label
    for p in sorted(rated, key=lambda p: p.frontier):
        e = p.ndcg10
        assert e is not None and p.seconds_per_query is not None
        low = max(0.0, e.value - e.low) if e.low is not None else 0.0
        high = max(0.0, e.high - e.value) if e.high is not None else 0.0
        colour = colours[p.keep] if p.frontier else "0.75"
        ax.errorbar([p.seconds_per_query], [e.value], yerr=[[low], [high]], fmt=markers[p.type], capsize=2,
                    color=colour, alpha=0.95 if p.frontier else 0.6, markersize=6 if p.frontier else 4,
                    markerfacecolor=colour if p.timing == "derived" else "white")
        if p.frontier:
            names.setdefault((p.seconds_per_query, e.value), []).append(
                f"{p.type}·{p.budget}" + ("" if p.keep is None else f"·N{p.keep}"))
    for (x, y), labels in names.items():
        ax.annotate(", ".join(labels), (x, y), fontsize=7, xytext=(4, -9), textcoords="offset points")
    line = sorted((p for p in rated if p.frontier), key=lambda p: p.seconds_per_query)  # type: ignore[arg-type]
    ax.step([p.seconds_per_query for p in line], [p.ndcg10.value for p in line], where="post",  # type: ignore
            color="tab:blue", linewidth=0.8, alpha=0.6)
    target = points.target
    if target is not None:
        ax.axvline(target.seconds, color="tab:red", linestyle="--", linewidth=0.8)
        best = next((p for p in rated if p.name == target.best), None)
        if best is not None:
            ax.scatter([best.seconds_per_query], [best.ndcg10.value], s=180, facecolors="none",  # type: ignore
                       edgecolors="tab:red", linewidths=1.2, zorder=5)
    xs = [p.seconds_per_query for p in rated]
    if xs and max(xs) / max(min(xs), 1e-9) > 20:  # type: ignore[type-var,operator]
        ax.set_xscale("log")
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], marker=m, linestyle="", color="black", label=label) for label, m in markers.items()]
    legend += [Line2D([], [], marker="o", linestyle="", color=c, label="all documents" if k is None else
                      f"prefilter top {k}") for k, c in colours.items() if any(p.keep == k for p in rated)]
    legend += [Line2D([], [], marker="o", linestyle="", color="0.75", label="off the frontier"),
               Line2D([], [], marker="o", linestyle="", color="tab:blue", markerfacecolor="white",
                      label="time measured (filled: derived)")]
    if target is not None:
        legend.append(Line2D([], [], color="tab:red", linestyle="--", label=f"target {target.seconds:g} s (○ best)"))
    ax.legend(handles=legend, fontsize=7, loc="lower right")
    ax.set_xlabel("seconds per query on this machine")
    ax.set_ylabel("nDCG@10")
    ax.set_title("Operating points: time against nDCG@10 (95% CI); the Pareto frontier in colour", fontsize=10)


def write_report(report: StudyReport, out: Path, *, stem: str = "study") -> list[Path]:
    """``STEM.md``, ``STEM.json``, ``STEM.png`` and ``STEM.html`` (the page with the pairs) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js, png, page = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}.html"
    plot(report, png)
    write_text_atomic(md, render_markdown(report, png.name))
    write_text_atomic(js, json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")
    write_text_atomic(page, render_page(report.title, [html_section(report, png.read_bytes())]))
    return [md, js, png, page]
