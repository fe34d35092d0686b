"""``rank1-bench``: reference runs and comparisons of runs against a reference.

    rank1-bench reference --model HF_DIR|hub-id --pairs PAIRS.jsonl --output REF.jsonl [--backend vllm|transformers]
    rank1-bench compare REF.jsonl RUN.jsonl [RUN2.jsonl …] [--qrels QRELS] [--out-dir DIR] [--tokenizer PATH]
    rank1-bench study --model HF_DIR|hub-id --types F16,Q8_0,Q4_K_M,Q4_K_M+imatrix (--pairs P --qrels Q | --beir DIR
        --run RUN | --ir-datasets ID | --mteb TASK) --work DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rank1_local.backends import open_reranker
from rank1_local.cli.main import add_scoring_args, scoring_config
from rank1_local.cli.support import (
    RawDescriptionFormatter,
    add_common_flags,
    add_subcommand,
    add_version,
    plain_text,
    run_command,
)
from rank1_local.core.config import OFFICIAL_BUDGET, OFFICIAL_CONTEXT, ScoringConfig
from rank1_local.core.extras import require
from rank1_local.core.reranker import Reranker

logger = logging.getLogger("rank1-bench")


def _reference_model(args: argparse.Namespace, config: ScoringConfig) -> Reranker:
    if args.backend == "vllm":
        settings = {"dtype": "float16" if args.dtype == "auto" else args.dtype,
                    "tensor_parallel_size": args.tensor_parallel_size, "enable_prefix_caching": args.prefix_caching}
    else:
        settings = {"device": args.device, "dtype": args.dtype}
    return open_reranker(args.backend, args.model, config, **settings)


def _cmd_reference(args: argparse.Namespace) -> int:
    from rank1_local.runs.run_file import score_pairs_file

    config = scoring_config(args)
    n = score_pairs_file(args.pairs, args.output, lambda: _reference_model(args, config), model_arg=str(args.model),
                         backend=args.backend, settings=config.to_dict(), progress=not args.quiet)
    logger.info("%d pairs scored into %s", n, args.output)
    return 0


def load_tokenizer(path: str) -> Callable[[str], list[int]]:
    """Token ids of text, from a GGUF file (llama.cpp, vocabulary only) or a Hugging Face folder/hub id."""
    if path.lower().endswith(".gguf"):
        from rank1_local.backends.llama.tokenizer import LlamaTokenizer
        from rank1_local.models.gguf_file import check_gguf_file

        check_gguf_file(Path(path))
        tokenizer = LlamaTokenizer(path)  # the vocabulary alone: no context, so nothing for llama.cpp to warn about
        bos = len(tokenizer.tokenize(""))  # the BOS token the model adds, if any: not part of the text
        return lambda text: tokenizer.tokenize(text)[bos:]
    from rank1_local.models.hub import resolve_local_or_hub

    transformers = require("transformers", "reference", "--tokenizer with a checkpoint folder (or pass a .gguf file)")
    tok = transformers.AutoTokenizer.from_pretrained(resolve_local_or_hub(path))
    return lambda text: tok.encode(text, add_special_tokens=False)


def _cmd_compare(args: argparse.Namespace) -> int:
    for module in ("scipy", "ir_measures", "matplotlib"):
        require(module, "bench", "rank1-bench compare")
    from benchmarks.compare import compare, plot, read_qrels, render_html, render_markdown, to_json
    from benchmarks.runfile import read_run
    from rank1_local.runs.atomic import write_text_atomic

    ref = read_run(args.reference)
    runs = [read_run(p) for p in args.runs]
    qrels = read_qrels(args.qrels) if args.qrels else None
    tokenize = load_tokenizer(args.tokenizer) if args.tokenizer else None
    results = compare(ref, runs, qrels=qrels, tokenize=tokenize)
    markdown = render_markdown(ref, results)
    print(markdown)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.name
        write_text_atomic(args.out_dir / f"{stem}.md", markdown)
        write_text_atomic(args.out_dir / f"{stem}.json", json.dumps(to_json(ref, results), indent=2) + "\n")
        png = args.out_dir / f"{stem}.png"
        if not args.no_plot:
            plot(ref, runs, results, png)
        write_text_atomic(args.out_dir / f"{stem}.html", render_html(
            ref, runs, results, plot_png=None if args.no_plot else png.read_bytes(), tokenize=tokenize))
        print(f"report: {args.out_dir / stem}.md / .json / .html" + ("" if args.no_plot else " / .png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rank1-bench", description=plain_text(__doc__),
                                     formatter_class=RawDescriptionFormatter)
    add_common_flags(parser)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_subcommand(sub, "reference", help="score a pairs file with the reference backend (vLLM, or transformers)")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--pairs", required=True, type=Path,
                   help='JSONL rows {"qid","query","docid","text"[,"title","instruction"]}')
    p.add_argument("--output", required=True, type=Path, help="run file (JSONL, appended, resumable)")
    p.add_argument("--backend", choices=["vllm", "transformers"], default="transformers",
                   help="vllm: the official fp16 setting (CUDA + vLLM); transformers: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--dtype", default="auto", help="auto (vllm/cuda: float16, cpu: float32), float32, float16, "
                   "bfloat16")
    p.add_argument("--device", default="auto", help="transformers: cpu, cuda, cuda:N or auto")
    add_scoring_args(p, budget=OFFICIAL_BUDGET, n_ctx=OFFICIAL_CONTEXT)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs to shard the model over")
    p.add_argument("--prefix-caching", action="store_true",
                   help="vllm: enable prefix caching (off by default, as in the official code)")
    p.set_defaults(func=_cmd_reference)

    p = add_subcommand(sub, "compare", help="compare run files with a reference run")
    p.add_argument("reference", type=Path, help="the reference run file (rank1-bench reference, or any run file)")
    p.add_argument("runs", type=Path, nargs="+", metavar="run",
                   help="run files to compare with the reference (rank1-local rerank --pairs … --output)")
    p.add_argument("--qrels", type=Path, default=None, help="TREC qrels (qid 0 docid rel): adds nDCG@10")
    p.add_argument("--tokenizer", default=None,
                   help="GGUF file or checkpoint: measure where reasoning diverges in tokens (default: characters)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write NAME.md, NAME.json, NAME.png and NAME.html (the pairs, offline) here")
    p.add_argument("--name", default="compare", help="report file name stem (default: compare)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.set_defaults(func=_cmd_compare)

    from benchmarks.study.cli import add_study_parser

    add_study_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), "interrupted; rows already written are kept, re-run to resume")


if __name__ == "__main__":
    sys.exit(main())
