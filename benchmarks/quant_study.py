"""The quantization accuracy study: every GGUF type against the reference, on the behaving fixture.

1. the behaving fixture (a trained 3-layer Qwen2 with the real Qwen2.5 tokenizer, see quantize/fixtures);
2. a pair set with many *uncertain* pairs (same-category topics, trained to P(true) between 0.3 and 0.7)
   and graded qrels from the task's labels;
3. the reference: vLLM in float16, the official engine and dtype (``rank1-bench reference --backend vllm``, run with
   the Python of vLLM's own virtualenv, ``--vllm-python``), or transformers fp32 with ``--reference transformers``;
4. each type exported with ``rank1-quantize gguf`` and run with the llama.cpp runtime, and the GPTQ/AWQ
   checkpoints made by ``rank1-quantize gptq|awq`` run with the transformers backend (float16 on CPU);
5. ``rank1-bench compare`` of every run against the reference -> results/quant_study.{md,json,png}.

Everything is cached in ``--work`` and every run file is resumable, so an interrupted study picks up where it
stopped. Usage:
    python benchmarks/quant_study.py [--vllm-python .vllm-venv/bin/python] [--types F16,Q8_0,…] [--work DIR] [--out …]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path

from quantize.fixtures.synthetic_task import CATEGORIES, SyntheticPair, make_pair

HERE = Path(__file__).resolve().parent
TYPES = "F32,F16,BF16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K,IQ4_XS"
IMATRIX_TYPES = "Q4_K_M,Q3_K_M,Q2_K,IQ4_XS,IQ2_M"
WEIGHT_QUANTS = "gptq-4bit,gptq-8bit,awq-4bit"
BUDGET = 64
N_CTX = 512
logger = logging.getLogger("quant_study")
REFERENCES = {"vllm": "vLLM in float16 — the official engine and dtype — on its CPU build",
              "transformers": "transformers fp32 on the CPU"}


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


def write_inputs(work: Path) -> tuple[Path, Path]:
    from rank1_local.runs.atomic import write_text_atomic

    pairs = study_pairs()
    rows = [{"qid": p.query_word, "query": p.query, "docid": p.passage_word, "text": p.passage} for p in pairs]
    pairs_file, qrels_file = work / "pairs.jsonl", work / "qrels.txt"
    write_text_atomic(pairs_file, "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(qrels_file, "".join(f"{p.query_word} 0 {p.passage_word} {relevance(p)}\n" for p in pairs))
    return pairs_file, qrels_file


def vllm_reference(python: Path, source: Path, pairs_file: Path, out: Path) -> None:
    """The float16 vLLM reference run, made by ``rank1-bench reference`` in vLLM's own virtualenv (resumable)."""
    import subprocess

    if not python.is_file():
        raise SystemExit(f"{python}: no such Python; build vLLM's virtualenv as the README's Tests section shows, "
                         "pass --vllm-python, or use --reference transformers")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    cmd = [str(python), "-m", "benchmarks.cli", "-q", "reference", "--backend", "vllm", "--dtype", "float16",
           "--model", str(source), "--pairs", str(pairs_file), "--output", str(out),
           "--max-think-tokens", str(BUDGET), "--n-ctx", str(N_CTX)]
    logger.info("vLLM reference: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=HERE.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=TYPES)
    parser.add_argument("--imatrix-types", default=IMATRIX_TYPES,
                        help="types also exported with a rank1 importance matrix ('' for none)")
    parser.add_argument("--weight-quants", default=WEIGHT_QUANTS,
                        help="GPTQ/AWQ checkpoints to add, METHOD-BITSbit ('' for none; needs the gptq extra)")
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: the fixture cache)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--reference", choices=["vllm", "transformers"], default="vllm",
                        help="vllm: float16 vLLM, the official setting (default); transformers: fp32 on the CPU")
    parser.add_argument("--vllm-python", type=Path, default=Path(".vllm-venv/bin/python"),
                        help="the Python of a virtualenv with vLLM and rank1-local (see the README's Tests)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from benchmarks.compare import compare, plot, read_qrels, render_markdown, to_json
    from benchmarks.runfile import read_run
    from quantize.fixtures import build_fixture, fixture_cache_dir
    from quantize.gguf_export import ImatrixOptions, export_gguf
    from quantize.weight_quant import WeightQuantOptions, export_weight_quant
    from rank1_local import Rank1, ScoringConfig
    from rank1_local.backends.hf import TransformersRank1
    from rank1_local.runs.atomic import write_text_atomic
    from rank1_local.runs.run_file import score_pairs_file

    source = build_fixture("behaving")
    work = args.work or fixture_cache_dir() / "quant-study" / source.name
    (work / "gguf").mkdir(parents=True, exist_ok=True)
    pairs_file, qrels_file = write_inputs(work)
    config = ScoringConfig(max_think_tokens=BUDGET, n_ctx=N_CTX)

    if args.reference == "vllm":
        ref_file = work / "reference-vllm-fp16.jsonl"
        vllm_reference(args.vllm_python, source, pairs_file, ref_file)
    else:
        ref_file = work / "reference-transformers-fp32.jsonl"
        score_pairs_file(pairs_file, ref_file, lambda: TransformersRank1(source, config, device="cpu",
                                                                         dtype="float32"),
                         model_arg=str(source), backend="transformers")
    run_files = []
    jobs = [(t, None) for t in args.types.split(",")] + [(t, "imatrix") for t in args.imatrix_types.split(",")]
    for gguf_type, variant in jobs:
        gguf_type = gguf_type.strip().upper()
        if not gguf_type:
            continue
        folder = work / ("gguf-imatrix" if variant else "gguf")
        gguf = folder / f"{source.name}-{gguf_type}.gguf"
        if not gguf.exists():
            folder.mkdir(parents=True, exist_ok=True)
            matrix = folder / f"{source.name}.imatrix.gguf"
            options = None if not variant else ImatrixOptions(matrix if matrix.exists() else "auto")
            export_gguf(source, folder, gguf_type, threads=args.threads, imatrix=options, allow_no_imatrix=True)
        run_file = work / f"{gguf_type}{'+imatrix' if variant else ''}.jsonl"
        score_pairs_file(pairs_file, run_file,
                         lambda g=gguf: Rank1(g, config, parallel=args.parallel, threads=args.threads),
                         model_arg=str(gguf), backend="llama.cpp")
        run_files.append(run_file)

    for name in filter(None, (n.strip().lower() for n in args.weight_quants.split(","))):
        method, bits = name.split("-")
        folder = work / "weight-quant" / name
        if not folder.exists():
            export_weight_quant(source, folder, WeightQuantOptions(method=method, bits=int(bits.removesuffix("bit")),
                                                                   device="cpu"))
        run_file = work / f"{name.upper().replace('BIT', 'bit')}.jsonl"
        score_pairs_file(pairs_file, run_file,
                         lambda f=folder: TransformersRank1(f, config, device="cpu"),
                         model_arg=str(folder), backend="transformers")
        run_files.append(run_file)

    ref = read_run(ref_file)
    runs = [read_run(p) for p in run_files]
    results = compare(ref, runs, qrels=read_qrels(qrels_file))
    n_uncertain = sum(p.kind == "related" for p in study_pairs())
    intro = (f"# Quantization study (behaving fixture)\n\n"
             f"{len(ref.rows)} pairs over {len({q for q, _ in ref.rows})} queries, {n_uncertain} of them uncertain "
             f"(same-category topics the fixture was trained to score between 0.3 and 0.7); reasoning budget "
             f"{BUDGET}, official protocol. Reference: {REFERENCES[args.reference]}. Every GGUF was "
             f"exported by `rank1-quantize gguf` and run by the llama.cpp runtime (parallel {args.parallel}, "
             f"{args.threads} threads on {platform.machine()}). nDCG@10 uses graded qrels from the task's labels "
             f"(2 same topic, 1 related topic trained towards true, 0 otherwise). Size is the GGUF file of a "
             f"24M-parameter model, where the embedding dominates: ratios between types, not absolute sizes, carry "
             f"over to real rank1 models. `+imatrix` rows were quantized with a rank1 importance matrix "
             f"(`--imatrix auto`: the packaged TREC RAG 2024 calibration prompts with the fixture's own greedy "
             f"reasoning), the others without. GPTQ/AWQ rows are checkpoints made by `rank1-quantize gptq|awq` (group size "
             f"128, calibrated on the same rank1 texts) and run with `--backend transformers` in float16 on the CPU; "
             f"their size is the whole checkpoint folder (tokenizer files included). Regenerate with `python benchmarks/quant_study.py`.\n\n")
    table = render_markdown(ref, results).split("\n", 2)[2]  # drop the generic title
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "quant_study.md", intro + table)
    write_text_atomic(args.out / "quant_study.json", json.dumps(to_json(ref, results), indent=2) + "\n")
    plot(ref, runs, results, args.out / "quant_study.png")
    print(intro + table)


if __name__ == "__main__":
    main()
