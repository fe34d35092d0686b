"""``rank1-quantize``: export rank1 checkpoints to GGUF, GPTQ and AWQ, and verify exports against their source."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rank1_local.cli.support import (
    HelpFormatter,
    RawDescriptionFormatter,
    add_common_flags,
    add_subcommand,
    add_version,
    plain_text,
    run_command,
)
from rank1_local.core.errors import Rank1Error

logger = logging.getLogger("rank1-quantize")


def _cmd_gguf(args: argparse.Namespace) -> int:
    from quantize.gguf_export import ImatrixOptions, export_gguf
    from quantize.verify import verify_gguf, write_report

    if args.force and args.bundle is None:
        raise Rank1Error("--force replaces a bundle: it goes with --bundle DIR")
    if args.bundle is not None:
        from quantize.export_bundle import check_bundle_folder

        check_bundle_folder(args.bundle, n_types=len([t for t in args.types.split(",") if t.strip()]))
    imatrix = None
    if args.imatrix:
        imatrix = ImatrixOptions(args.imatrix, calibration=args.calibration, size=args.calibration_size,
                                 seed=args.calibration_seed, max_think_tokens=args.calibration_budget)
    elif args.calibration:
        raise Rank1Error("--calibration is used to compute an importance matrix: add --imatrix auto")
    results = export_gguf(args.model, args.out, args.types, threads=args.threads, progress=not args.quiet,
                          imatrix=imatrix, allow_no_imatrix=args.allow_no_imatrix, rerank=args.rerank)
    for r in results:
        print(f"{r.type:8s} {r.n_bytes / 1e6:10.1f} MB {r.seconds:7.1f} s  {r.path}")
    reports = {}
    if args.verify:
        source = Path(args.model) if Path(args.model).expanduser().exists() else args.model
        for r in results:
            report = reports[r.type] = verify_gguf(r.path, source, n_prompts=args.verify_prompts,
                                                   threads=args.threads, progress=not args.quiet)
            json_path, _ = write_report(report)
            print(f"{r.type:8s} KL {report.kl_mean:.3g}  top-1 {report.top1_agreement:.2%}  "
                  f"max |Δscore| {report.score_abs_diff_max:.3g}  -> {json_path}")
    if args.bundle is not None:
        from quantize.export_bundle import bundle_dir, write_export_bundle

        for r in results:
            bundle = write_export_bundle(r, args.model, bundle_dir(args.bundle, r, len(results)),
                                         report=reports.get(r.type), replace=args.force)
            print(f"{r.type:8s} bundle {bundle.path} (card {bundle.card}"
                  f"{', with its verification card' if bundle.verification else ''})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from quantize.verify import render_markdown, verify_gguf, write_report

    report = verify_gguf(args.gguf, args.source, n_prompts=args.prompts, calibration=args.calibration,
                         threads=args.threads, progress=not args.quiet)
    json_path, md_path = write_report(report)
    print(render_markdown(report))
    print(f"report: {json_path}\n        {md_path}")
    return 0


def _cmd_weight_quant(args: argparse.Namespace) -> int:
    from quantize.weight_quant import WeightQuantOptions, export_weight_quant

    options = WeightQuantOptions(method=args.command, bits=args.bits, group_size=args.group_size,
                                 calibration=args.calibration, calibration_size=args.calibration_size,
                                 calibration_seed=args.calibration_seed, calibration_budget=args.calibration_budget,
                                 device=args.device)
    r = export_weight_quant(args.model, args.out, options, progress=not args.quiet)
    print(f"{r.method.upper()} {r.bits}-bit g{r.group_size}  {r.n_bytes / 1e6:.1f} MB  {r.seconds:.0f} s  {r.path}")
    print(f"calibration: {r.calibration}")
    return 0


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", type=Path, default=None,
                   help="calibration pairs JSONL {qid, docid, query, text} (default: packaged TREC RAG 2024 sample)")
    p.add_argument("--calibration-size", type=int, default=None, help="pairs drawn from the calibration file")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--calibration-budget", type=int, default=256,
                   help="reasoning tokens the source model writes per calibration pair")


def _cmd_fixture(args: argparse.Namespace) -> int:
    from quantize.fixtures import FIXTURES, build_fixture

    names = args.names or list(FIXTURES)
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        raise Rank1Error(f"unknown fixture {unknown[0]!r}; known: {', '.join(FIXTURES)}")
    for name in names:
        print(f"{name}\t{build_fixture(name, progress=not args.quiet)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from quantize.demo import run_demo

    return run_demo(progress=not args.quiet)


def _fixture_epilog() -> str:
    from quantize.fixtures import FIXTURES

    rows = "\n".join(f"  {name:24s} {spec.description}" for name, spec in FIXTURES.items())
    return (f"fixtures:\n{rows}\n\nA fixture is a tiny model with a real architecture and tokenizer (rank1's, or "
            "Qwen3-Reranker's), for trying the "
            "tools and for tests; it is not a rank1 model and its scores mean nothing about real passages. Building "
            "one needs torch and transformers (pip install torch --index-url https://download.pytorch.org/whl/cpu, "
            "then pip install -e '.[reference]') and takes about 30 s to a few minutes on 2 CPU cores (the trained "
            "ones check their behaviour, with a progress bar). Built once, then cached in ~/.cache/rank1-local/"
            "fixtures (RANK1_FIXTURES_DIR moves it).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rank1-quantize", description=plain_text(__doc__),
                                     formatter_class=HelpFormatter)
    add_common_flags(parser)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_subcommand(sub, "gguf", help="export a Hugging Face checkpoint (folder or hub id) to GGUF")
    p.add_argument("model", help="local checkpoint folder or hub id, e.g. jhu-clsp/rank1-7b")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--types", default="Q8_0",
                   help="comma-separated GGUF types: F32,F16,BF16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K,IQ4_XS …")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--imatrix", default=None, metavar="auto|FILE",
                   help="importance matrix for llama.cpp-quantized types (needed by IQ1/IQ2/IQ3_XXS/Q2_K_S): 'auto' "
                        "computes it with the source model over rank1 calibration texts (needs the reference "
                        "extra) and saves DIR/<name>.imatrix.gguf; FILE reads llama-imatrix output (.gguf or .dat)")
    p.add_argument("--allow-no-imatrix", action="store_true",
                   help="quantize IQ3_XS/IQ3_S/IQ3_M/IQ4_NL/IQ4_XS without an importance matrix (lower quality)")
    _add_calibration_args(p)
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help="write the classifier head, rank pooling and rerank prompt llama-server --reranking needs "
                        "(default: for a Qwen3-Reranker, recognised by its name or its model card's heading)")
    p.add_argument("--verify", action="store_true", help="verify every export against the source afterwards")
    p.add_argument("--verify-prompts", type=int, default=8, help="calibration prompts --verify compares on")
    p.add_argument("--bundle", type=Path, default=None, metavar="DIR",
                   help="also write a bundle (GGUF + manifest with SHA-256, source and, with --verify, the verification "
                        "card) for rank1-local --model DIR on offline machines; one type: DIR is the bundle, several: "
                        "one bundle per type inside DIR")
    p.add_argument("--force", action="store_true", help="replace a different bundle already in --bundle DIR")
    p.set_defaults(func=_cmd_gguf)

    for method, bits_help in (("gptq", "4 or 8"), ("awq", "4")):
        p = add_subcommand(sub, method, help=f"{method.upper()} checkpoint for vLLM and transformers (needs the gptq "
                                             "extra)")
        p.add_argument("model", help="local checkpoint folder or hub id, e.g. jhu-clsp/rank1-7b")
        p.add_argument("--out", required=True, type=Path, help="new output folder")
        p.add_argument("--bits", type=int, default=4, help=f"weight bits: {bits_help}")
        p.add_argument("--group-size", type=int, default=128,
                       help="columns sharing one scale; must divide the layers' input sizes" +
                            (" (-1: one group per row)" if method == "gptq" else ""))
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
        _add_calibration_args(p)
        p.set_defaults(func=_cmd_weight_quant)

    p = add_subcommand(sub, "verify", help="compare a GGUF with its source checkpoint (or another GGUF)")
    p.add_argument("gguf", type=Path, help="the GGUF file to check")
    p.add_argument("--source", required=True, help="checkpoint folder, hub id, or a reference .gguf file")
    p.add_argument("--prompts", type=int, default=8, help="number of calibration prompts")
    p.add_argument("--calibration", type=Path, default=None,
                   help="JSONL of {qid, docid, query, text} (default: packaged TREC RAG 2024 sample)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(func=_cmd_verify)

    p = add_subcommand(sub, "fixture", help="build small offline fixture checkpoints with real rank1 architectures "
                                            "(not rank1 models; needs torch: the reference extra)",
                       epilog=_fixture_epilog(), formatter_class=RawDescriptionFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="fixtures to build (default: all; listed below)")
    p.set_defaults(func=_cmd_fixture)

    p = add_subcommand(sub, "demo", help=DEMO_HELP)
    p.set_defaults(func=_cmd_demo)
    return parser


DEMO_HELP = ("see it work, with no hub and no torch: rebuild the behaving fixture from its shipped weights, export it to "
             "GGUF, check it on llama.cpp and rerank three passages, saying what each step did and how long it took "
             "(the first run needs the package index once, for llama.cpp's tokenizer files; later runs reuse it all)")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv),
                       "interrupted; finished files are complete and no partial file was left")


if __name__ == "__main__":
    sys.exit(main())
