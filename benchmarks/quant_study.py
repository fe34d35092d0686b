"""Regenerate benchmarks/results/quant_study.{md,json,png,html}: `rank1-bench study` on the quantization test bed and
on the behaving fixture.

1. The test bed, ``behaving-outliers``: the behaving fixture (a trained 3-layer Qwen2 that reasons rank1-style on a
   synthetic task) given the weight and activation statistics that make LLMs sensitive to quantization, by
   function-preserving power-of-two rescalings (quantize/fixtures/outliers.py). Its numbers test our machinery (does
   the study detect damage, does the importance matrix weigh the right columns); they are not a claim about real rank1
   models.
2. The behaving fixture itself, GGUF types only: the second table (a model without outliers keeps its decisions).

Both are scored on the same pairs: per query word, the same word, the five same-category words (uncertain pairs,
trained to P(true) between 0.3 and 0.7) and two other-category words; graded qrels from the task's labels. The
reference is vLLM in float16 (the official engine and dtype), run with the Python of vLLM's own virtualenv
(``--vllm-python``), or transformers fp32 with ``--reference transformers``. Everything is cached in ``--work`` and
resumes. Usage:
    python benchmarks/quant_study.py [--vllm-python .vllm-venv/bin/python] [--work DIR] [--out benchmarks/results]
    python benchmarks/quant_study.py --html-only   # quant_study.html and .md again from quant_study.json (no pairs)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from quantize.fixtures.synthetic_task import CATEGORIES, SyntheticPair, make_pair

HERE = Path(__file__).resolve().parent
TEST_BED_TYPES = ("F16,Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K,Q4_K_M+imatrix,Q3_K_M+imatrix,Q2_K+imatrix,IQ3_M+imatrix,"
                  "gptq-4bit,awq-4bit")
BEHAVING_TYPES = "F16,Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K,Q4_K_M+imatrix,Q3_K_M+imatrix,Q2_K+imatrix"
BUDGET = 64
N_CTX = 512
logger = logging.getLogger("quant_study")
NOT_A_CLAIM = ("**This is a test of our machinery, not a claim about real rank1 models**: the test bed is a 24M-parameter "
               "fixture trained on a synthetic task, given outlier statistics on purpose. Its numbers show whether the "
               "study detects damage and what the importance matrix does to such weights; sizes are those of a model "
               "whose embedding dominates (ratios between GGUF types carry over, absolute sizes do not).")


def study_pairs() -> list[SyntheticPair]:
    """Per query word: the same word, all five same-category words (uncertain) and two other-category words."""
    cats = list(CATEGORIES.values())
    pairs = []
    for ci, words in enumerate(cats):
        for wi, word in enumerate(words):
            pairs.append(make_pair(word, word))
            pairs += [make_pair(word, other) for other in words if other != word]
            pairs += [make_pair(word, cats[(ci + k) % len(cats)][wi]) for k in (1, 3)]
    return pairs


def relevance(pair: SyntheticPair) -> int:
    """Graded qrels: 2 the same topic, 1 a related topic trained towards 'true', else 0."""
    return 2 if pair.kind == "same" else int(pair.label)


def study_inputs():  # -> benchmarks.study.inputs.StudyInputs
    from benchmarks.study.inputs import StudyInputs
    from rank1_local.runs.inputs import PairRow

    pairs = study_pairs()
    rows = [PairRow(p.query_word, p.query, p.passage_word, p.passage) for p in pairs]
    qrels: dict[str, dict[str, int]] = {}
    for p in pairs:
        qrels.setdefault(p.query_word, {})[p.passage_word] = relevance(p)
    n_uncertain = sum(p.kind == "related" for p in pairs)
    return StudyInputs(rows, qrels, f"the synthetic task's pairs, {n_uncertain} of them uncertain; graded qrels 2 same "
                                    "topic, 1 related topic trained towards true, 0 otherwise")


def run_one(fixture: str, types: str, args: argparse.Namespace, title: str, note: str):  # -> StudyReport
    from benchmarks.study.exports import parse_study_types
    from benchmarks.study.report import analyse_study
    from benchmarks.study.study import StudySettings, run_study
    from quantize.fixtures import build_fixture, fixture_cache_dir
    from rank1_local.core.config import ScoringConfig

    source = build_fixture(fixture)
    inputs = study_inputs()
    settings = StudySettings(
        model=str(source), types=parse_study_types(types), config=ScoringConfig(max_think_tokens=BUDGET, n_ctx=N_CTX),
        work=(args.work or fixture_cache_dir() / "quant-study") / source.name, out=args.out, reference=args.reference,
        vllm_python=str(args.vllm_python) if args.reference == "vllm" else None, parallel=args.parallel,
        threads=args.threads, title=title, note=note)
    runs = run_study(inputs, settings)
    return analyse_study(runs, inputs, settings)


def demote(markdown: str) -> str:
    """Headings one level down (the second study goes under the first's title)."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines()) + "\n"


PAGE_TITLE = "Quantization studies: the test bed and the behaving fixture"


def write_html(reports: dict, out: Path) -> Path:  # reports: name -> StudyReport
    """quant_study.html: each study a section (the plot is the test bed's)."""
    from benchmarks.html_report import render_page
    from benchmarks.study.report import html_section
    from rank1_local.runs.atomic import write_text_atomic

    png = (out / "quant_study.png").read_bytes()
    page = out / "quant_study.html"
    write_text_atomic(page, render_page(PAGE_TITLE, [html_section(r, png if name == "test_bed" else None)
                                                     for name, r in reports.items()]))
    return page


def html_from_json(out: Path) -> Path:
    """quant_study.html and quant_study.md from the committed quant_study.json: the tables and the plot, without
    pairs (the JSON does not keep the runs' chains; a full run of this script writes them). The markdown keeps the
    run's own closing paragraph."""
    from benchmarks.study.report import render_markdown, report_from_json
    from rank1_local.runs.atomic import write_text_atomic

    data = json.loads((out / "quant_study.json").read_text(encoding="utf-8"))
    reports = {name: report_from_json(data[name]) for name in ("test_bed", "behaving") if name in data}
    markdown = render_markdown(reports["test_bed"], "quant_study.png")
    if "behaving" in reports:
        markdown += "\n" + demote(render_markdown(reports["behaving"], None))
    old = (out / "quant_study.md").read_text(encoding="utf-8") if (out / "quant_study.md").exists() else ""
    closing = old[old.rfind("\nRegenerate with"):] if "\nRegenerate with" in old else ""
    write_text_atomic(out / "quant_study.md", markdown + closing)
    return write_html(reports, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: the fixture cache)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--reference", choices=["vllm", "transformers"], default="vllm",
                        help="vllm: float16 vLLM, the official setting (default); transformers: fp32 on the CPU")
    parser.add_argument("--vllm-python", type=Path, default=Path(".vllm-venv/bin/python"),
                        help="the Python of a virtualenv with vLLM and rank1-local (see the README's Tests)")
    parser.add_argument("--skip-behaving", action="store_true", help="only the test bed")
    parser.add_argument("--html-only", action="store_true",
                        help="only write quant_study.html and quant_study.md again, from quant_study.json in --out "
                             "(without pairs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.html_only:
        print(html_from_json(args.out))
        return

    from benchmarks.study.report import plot, render_markdown
    from rank1_local.runs.atomic import write_text_atomic

    start = time.perf_counter()
    test_bed = run_one("behaving-outliers", TEST_BED_TYPES, args, "Quantization study: the test bed (behaving-outliers)",
                       NOT_A_CLAIM)
    reports = {"test_bed": test_bed}
    markdown = render_markdown(test_bed, "quant_study.png")
    if not args.skip_behaving:
        behaving = run_one("behaving", BEHAVING_TYPES, args, "Second table: the behaving fixture (no outliers)",
                           "The same pairs, reference and types on the behaving fixture, whose weights are close to "
                           "Gaussian (kurtosis about 3) and which has no outlier channels: what the same types do to the "
                           "model before the test bed's statistics were added. Also a test of our machinery, not a "
                           "claim about real rank1 models.")
        reports["behaving"] = behaving
        markdown += "\n" + demote(render_markdown(behaving, None))
    seconds = time.perf_counter() - start
    markdown += (f"\nRegenerate with `python benchmarks/quant_study.py --vllm-python .vllm-venv/bin/python` (the "
                 f"reference in vLLM's own virtualenv). This run took {seconds / 60:.1f} minutes on this machine (2 "
                 "cores shared with other jobs), exports, importance matrices, GPTQ/AWQ and scoring included; pairs/s "
                 "and time vary with the load of the moment.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(test_bed, args.out / "quant_study.png")
    write_text_atomic(args.out / "quant_study.md", markdown)
    write_text_atomic(args.out / "quant_study.json", json.dumps(
        {k: r.to_json() for k, r in reports.items()} | {"seconds": seconds}, indent=2, ensure_ascii=False,
        default=str) + "\n")
    write_html(reports, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
