"""``rank1-bench study``: the quantization study from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rank1_local.cli.main import add_scoring_args, scoring_config
from rank1_local.cli.ray_commands import add_ray_rerank_args, uses_ray
from rank1_local.cli.support import add_subcommand
from rank1_local.core.cards import CARDS
from rank1_local.core.config import OFFICIAL_BUDGET, OFFICIAL_CONTEXT
from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.runs.inputs import check_output_folder

logger = logging.getLogger("rank1-bench")
DEFAULT_TYPES = "F16,Q8_0,Q4_K_M,Q4_K_M+imatrix,Q3_K_M,Q3_K_M+imatrix,Q2_K,Q2_K+imatrix"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be at least 1")
    return values


def counts(text: str | None, flag: str, *, all_word: bool = False) -> tuple[int, ...]:
    """``--budgets 8,16,64`` / ``--keep all,4``: whole numbers of at least 1 ("all" skipped where it means every
    document), or an error naming the flag."""
    if text is None:
        return ()
    words = [x.strip() for x in text.split(",") if x.strip() and not (all_word and x.strip().lower() == "all")]
    try:
        values = tuple(int(x) for x in words)
    except ValueError:
        raise Rank1Error(f"{flag}: expected comma-separated whole numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise Rank1Error(f"{flag}: values must be at least 1, got {text!r}")
    return values


def sweep_config(args: argparse.Namespace):  # -> ScoringConfig
    """The protocol settings, with ``--budgets``: the largest is generated, the others derived from it."""
    import dataclasses

    budgets = sorted(set(counts(args.budgets, "--budgets")))
    if not budgets:
        return scoring_config(args)
    args.max_think_tokens = budgets[-1]
    return dataclasses.replace(scoring_config(args), derive_budgets=tuple(budgets[:-1]))


def read_study_inputs(args: argparse.Namespace):  # -> StudyInputs
    from benchmarks.study import inputs

    if args.qrels is not None and args.pairs is None:
        raise Rank1Error("--qrels goes with --pairs (BEIR folders, ir_datasets and MTEB tasks bring their own)")
    if args.run is not None and not (args.beir or args.ir_datasets):
        raise Rank1Error("--run goes with --beir or --ir-datasets")
    if args.pairs is not None:
        return inputs.from_pairs_file(args.pairs, args.qrels)
    if args.beir is not None:
        if args.run is None:
            raise Rank1Error("--beir needs --run FIRST_STAGE.trec (the ranking to rerank, e.g. BM25 top-100)")
        return inputs.from_beir(args.beir, args.run, depth=args.depth, split=args.split)
    if args.ir_datasets is not None:
        return inputs.from_ir_datasets(args.ir_datasets, args.run, depth=args.depth)
    task, _, subset = args.mteb.partition("/")
    return inputs.from_mteb(task, split=args.split, subset=subset or None, depth=args.depth)


def cmd_study(args: argparse.Namespace) -> int:
    for module in ("scipy", "matplotlib"):
        require(module, "bench", "rank1-bench study")
    from benchmarks.study.exports import Calibration, parse_study_types
    from benchmarks.study.report import analyse_study, write_report
    from benchmarks.study.scoring import RayOptions, make_scorer
    from benchmarks.study.study import (
        StudySettings,
        Sweep,
        check_card,
        check_engines,
        check_sweep,
        check_vllm_python,
        default_reference,
        run_study,
        study_card,
    )

    config = sweep_config(args)  # a bad budget is refused before anything else
    card = study_card(args.model, args.card)
    sweep = Sweep(args.prefilter, args.prefilter_backend, counts(args.keep, "--keep", all_word=True),
                  args.target_latency)
    ray = None
    if uses_ray(args) and (config.derive_budgets or sweep.prefilter):
        raise Rank1Error("--budgets and --prefilter do not run on Ray yet: leave out --ray")
    if uses_ray(args):  # a Ray-only flag without --ray is refused here, before anything runs
        ray = RayOptions(args.ray, workers=args.workers or 1, threads_per_worker=args.threads_per_worker or args.threads or 1,
                         gpus_per_worker=args.gpus_per_worker or 0.0, pairs_per_block=args.pairs_per_block)
    scorer = make_scorer(ray)
    types = parse_study_types(args.types)
    check_sweep(config, types, args.weight_quant_backend)
    check_card(card, config, args.reference, types, args.weight_quant_backend)
    check_vllm_python(args.vllm_python)
    if args.reference is None and not card.reasons:
        args.reference = "transformers"  # the model card's own code; the vLLM backend runs rank1's flow only
    if args.reference is None:
        args.reference = "vllm" if ray is not None else default_reference(args.vllm_python)
    if ray is None:  # before the inputs are read (an ir_datasets id or MTEB task may download) or anything exported
        check_engines(args.reference, types, weight_quant_backend=args.weight_quant_backend,
                      vllm_python=args.vllm_python)
    for flag, folder in (("--work", args.work), ("--out", args.out)):
        check_output_folder(folder, flag)
    study_inputs = read_study_inputs(args)
    if sweep.target_latency is not None and study_inputs.qrels is None:
        raise Rank1Error("--target-latency picks the point with the best nDCG@10, which needs qrels (--qrels, or a "
                         "BEIR folder, ir_datasets or MTEB task with judgments)")
    if args.prompt is None and args.dataset is None and study_inputs.dataset:
        args.dataset = study_inputs.dataset
        logger.info("dataset prompt: %s's, as the official evaluation picks it (--dataset none for no prompt)",
                    study_inputs.dataset)
    settings = StudySettings(
        model=args.model, types=types, config=config, work=args.work, out=args.out,
        reference=args.reference, reference_dtype=args.reference_dtype, vllm_python=args.vllm_python,
        weight_quant_backend=args.weight_quant_backend, parallel=args.parallel, threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        calibration=Calibration(args.calibration, args.calibration_size, args.calibration_seed,
                                args.calibration_budget),
        recall_k=args.recall_k, drop_queries_without_relevant=args.drop_queries_without_relevant, title=args.title,
        note=args.note, progress=not args.quiet, sweep=sweep, card=card.name)
    runs = run_study(study_inputs, settings, scorer)
    report = analyse_study(runs, study_inputs, settings)
    files = write_report(report, args.out)
    print(f"report: {', '.join(str(f) for f in files)}")
    return 0


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "study", help="export a model to several types, score each and a reference, compare (resumable)",
        description="Export a model to quantization types, score the reference and every export with the official "
                    "protocol on your pairs, and report decision flips, KL divergence, rank correlations, nDCG@10 "
                    "with paired tests, reasoning fidelity and cost, with 95% confidence intervals. Every step "
                    "resumes from --work.")
    p.add_argument("--model", required=True, help="the source checkpoint: a folder or a hub id")
    p.add_argument("--card", default=None, metavar="|".join(CARDS),
                   help="the model card every run scores under (default: recognised from the checkpoint's config and "
                        "name); a card that does not reason (qwen3-reranker) takes no --budgets, and its reference is "
                        "transformers")
    p.add_argument("--types", default=DEFAULT_TYPES,
                   help=f"comma-separated: GGUF types (F16, Q8_0, Q4_K_M, IQ3_M …), TYPE+imatrix (quantized with the "
                        f"rank1 importance matrix), gptq-4bit, gptq-8bit, awq-4bit (default {DEFAULT_TYPES})")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, help='pairs JSONL {"qid","query","docid","text"[,"title","instruction"]}')
    source.add_argument("--beir", type=Path, metavar="DIR", help="a BEIR folder (corpus.jsonl, queries.jsonl, "
                        "qrels/SPLIT.tsv); needs --run")
    source.add_argument("--ir-datasets", metavar="ID", help="an ir_datasets id (its scoreddocs as first stage "
                        "unless --run)")
    source.add_argument("--mteb", metavar="TASK[/SUBSET]", help="an MTEB reranking task (its top-ranked documents)")
    p.add_argument("--qrels", type=Path, help="with --pairs: TREC (qid 0 docid grade) or BEIR qrels")
    p.add_argument("--run", type=Path, metavar="FIRST_STAGE.trec", help="first-stage TREC run to rerank")
    p.add_argument("--depth", type=int, default=100, help="documents reranked per query (default 100)")
    p.add_argument("--split", default="test", help="BEIR/MTEB split (default test)")
    p.add_argument("--reference", choices=["vllm", "transformers"], default=None,
                   help="vllm: the official engine, float16; transformers: float16 on CUDA, float32 on CPU (default: "
                        "vllm where it is installed, in this Python or --vllm-python, else transformers; "
                        "transformers for a card that does not reason)")
    p.add_argument("--reference-dtype", default=None, help="override the reference's dtype (float16, bfloat16, "
                   "float32)")
    p.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="the Python of a virtualenv with vLLM and rank1-local (vLLM pins its own transformers; see "
                        "the README's Tests); default: this Python")
    p.add_argument("--weight-quant-backend", choices=["transformers", "vllm"], default="transformers",
                   help="where GPTQ/AWQ checkpoints run (default transformers)")
    add_scoring_args(p, budget=OFFICIAL_BUDGET, n_ctx=OFFICIAL_CONTEXT)
    p.add_argument("--budgets", default=None, metavar="B1,B2,…",
                   help="reasoning budgets to map, e.g. 128,512,2048,8192: the largest is generated (it replaces "
                        "--max-think-tokens) and each smaller one derived from that one generation; every budget is "
                        "an operating point")
    p.add_argument("--prefilter", default=None, metavar="MODEL",
                   help="a fast reranker (a Qwen3-Reranker GGUF) scored on every pair: with --keep, the cascade "
                        "points (rank1 on its best N per query, its order below them)")
    p.add_argument("--prefilter-backend", choices=("llama.cpp", "transformers"), default="llama.cpp",
                   help="the library that runs the prefilter (default llama.cpp)")
    p.add_argument("--keep", default=None, metavar="N[,N…]",
                   help="with --prefilter: the cuts to map (documents per query rank1 reasons over); every "
                        "document (all) is always a point")
    p.add_argument("--target-latency", type=float, default=None, metavar="SECONDS",
                   help="name the point with the best nDCG@10 within SECONDS per query on this machine, and the "
                        "points a paired test cannot tell apart from it (needs qrels)")
    p.add_argument("--parallel", type=int, default=8, help="llama.cpp: pairs decoded together (default 8)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp: CPU threads (default: all cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp: layers offloaded to the GPU (-1: all)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration pairs for importance matrices and GPTQ/AWQ (default: packaged TREC RAG 2024)")
    p.add_argument("--calibration-size", type=int, default=None, help="pairs drawn from the calibration file")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--calibration-budget", type=int, default=256, help="reasoning tokens per calibration pair")
    p.add_argument("--recall-k", type=_ints, default=(10,), help="Recall@k cut-offs (default 10; only those below "
                   "the depth are reported)")
    p.add_argument("--drop-queries-without-relevant", action="store_true",
                   help="leave judged queries without a relevant document out of nDCG@10 and Recall@k (as some "
                        "papers do; default: they count 0, as trec_eval counts them)")
    p.add_argument("--work", type=Path, required=True, help="cache of inputs, exports and run files (resumable)")
    p.add_argument("--out", type=Path, required=True,
                   help="where study.md, study.json, study.png and study.html (every pair, offline) go")
    p.add_argument("--title", default="Quantization study", help="the title of study.md")
    p.add_argument("--note", default=None, help="a paragraph for the top of study.md")
    add_ray_rerank_args(p)  # --ray [auto|ADDRESS], --workers, --threads-per-worker, --gpus-per-worker …
    p.set_defaults(func=cmd_study, interrupted="interrupted; --work keeps every finished export and every row "
                                               "already scored, run the same command again to resume")
