"""Regenerate benchmarks/results/operating_points.{md,json,png,html}: `rank1-bench study` as an operating-point map on
the quantization test bed (the ``behaving-outliers`` fixture, as benchmarks/quant_study.py uses it), with a prefilter.

Budgets 8, 16, 32 and 64 tokens (64 generated, the others derived from it) × F16, Q8_0 and Q4_K_M × every document or
the prefilter's best 4 per query, where the prefilter is the ``qwen3-reranker-behaving`` fixture (a tiny Qwen3 trained
on the same synthetic task in Qwen3-Reranker's prompt) exported to GGUF: a prefill reranker that answers at the last
prompt position, in front of a reasoner, the realistic cascade. The pairs are quant_study's: per query word the same
word, its five same-category words and two others (42 queries, 336 pairs), graded qrels. The reference is transformers
fp32 at 64 tokens. The numbers test the machinery (does the derivation, the cascade, the time model and the frontier
work end to end); they say nothing of rank1's quality or speed on real data. Usage:

    python benchmarks/operating_points.py [--work DIR] [--out benchmarks/results] [--target-latency 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TYPES = "F16,Q8_0,Q4_K_M"
BUDGETS = (8, 16, 32, 64)
KEEP = 4
N_CTX = 512
PREFILTER = "qwen3-reranker-behaving"
NOT_A_CLAIM = ("**Fixture numbers: they test the machinery, not rank1's quality.** The model is the quantization test "
               "bed (a 24M-parameter fixture trained on a synthetic task, given outlier statistics on purpose) and the "
               "prefilter the qwen3-reranker-behaving fixture (a tiny Qwen3 trained briefly on the same task in "
               "Qwen3-Reranker's prompt: it answers yes or no at once, no reasoning). What this shows is that the budget "
               "derivation, the cascade, the time model and the frontier work end to end on this machine; the numbers "
               "predict nothing about a real rank1 checkpoint, or a real Qwen3-Reranker, on your data.")


def prefilter_gguf(work: Path) -> Path:
    """The prefilter fixture exported to GGUF (F16: a prefilter is small), made once in ``work``; a prefilter run
    left there by another prefilter (its run file names its model) is removed, so that the study scores this one."""
    from quantize.fixtures import build_fixture
    from quantize.gguf_export import export_gguf
    from rank1_local.runs.run_header import header_path, read_header

    folder = work / "prefilter" / PREFILTER
    made = sorted(folder.glob("*.gguf"))
    if made:
        gguf = made[0]
    else:
        (result,) = export_gguf(build_fixture(PREFILTER), folder, ["F16"], progress=False, allow_no_imatrix=True)
        gguf = result.path
    run = work / "runs" / "prefilter.jsonl"
    header = read_header(header_path(run)) if header_path(run).exists() else None
    if header is not None and Path(header.model_file) != gguf:
        for stale in run.parent.glob("prefilter.*"):
            stale.unlink()
    return gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: the fixture cache)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--target-latency", type=float, default=1.0, help="seconds per query (default 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from benchmarks.quant_study import study_inputs
    from benchmarks.study.exports import parse_study_types
    from benchmarks.study.report import analyse_study, write_report
    from benchmarks.study.study import StudySettings, Sweep, run_study
    from quantize.fixtures import build_fixture, fixture_cache_dir
    from rank1_local.core.config import ScoringConfig

    source = build_fixture("behaving-outliers")
    work = (args.work or fixture_cache_dir() / "operating-points") / source.name
    start = time.perf_counter()
    load = os.getloadavg()
    settings = StudySettings(
        model=str(source), types=parse_study_types(TYPES),
        config=ScoringConfig(max_think_tokens=BUDGETS[-1], n_ctx=N_CTX, derive_budgets=BUDGETS[:-1]), work=work,
        out=args.out, reference="transformers", parallel=args.parallel, threads=args.threads,
        title="Operating points: the test bed (behaving-outliers) with a Qwen3-Reranker fixture as prefilter",
        note=NOT_A_CLAIM, sweep=Sweep(str(prefilter_gguf(work)), keeps=(KEEP,), target_latency=args.target_latency))
    inputs = study_inputs()
    report = analyse_study(run_study(inputs, settings), inputs, settings)
    seconds = time.perf_counter() - start
    report.note = (f"{NOT_A_CLAIM}\n\nRegenerate with `python benchmarks/operating_points.py`. This run took "
                   f"{seconds / 60:.1f} minutes on this machine ({os.cpu_count()} cores shared with other jobs; load "
                   f"average {load[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end): the seconds per "
                   "query are this machine's under that load.")
    for path in write_report(report, args.out, stem="operating_points"):
        print(path)


if __name__ == "__main__":
    main()
