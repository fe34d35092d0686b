"""``rank1-local``: rerank with a rank1 model (GGUF in llama.cpp; checkpoints in transformers or vLLM), serve it over
HTTP, keep its judgments in a cache, and bundle it for offline use."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rank1_local.backends import BACKENDS, BackendSpec, backend_spec
from rank1_local.cli.bundle_commands import add_bundle_commands
from rank1_local.cli.cache_commands import add_cache_arg, add_cache_parser, cache_path
from rank1_local.cli.output import print_results
from rank1_local.cli.ray_commands import add_ray_rerank_args, add_ray_serve_args, uses_ray
from rank1_local.cli.support import (
    HelpFormatter,
    add_common_flags,
    add_subcommand,
    add_version,
    plain_text,
    run_command,
)
from rank1_local.core.cards import CARDS, card_named
from rank1_local.core.config import OFFICIAL_BUDGET, OFFICIAL_CONTEXT, ScoringConfig
from rank1_local.core.dataset_prompts import NO_PROMPT, resolve_dataset
from rank1_local.core.errors import Rank1Error
from rank1_local.core.protocol import PROTOCOLS
from rank1_local.core.reranker import Reranker, check_top_k, ranked
from rank1_local.core.results import Rank1Result
from rank1_local.models.file_digest import VERIFY_ENV, VERIFY_MODES, verify_mode

logger = logging.getLogger("rank1-local")
PAIRS_INTERRUPTED = "interrupted; rows already written to --output are kept, run the same command again to resume"

SERVE_PARALLEL = 8  # the server's default slots (a library call's default is LlamaSettings')
# backend settings fields -> the command-line flags (args attributes) that set them
SETTING_FLAGS = {"device": "device", "dtype": "dtype", "enable_prefix_caching": "prefix_caching",
                 "n_gpu_layers": "n_gpu_layers", "parallel": "parallel", "threads": "threads",
                 "max_waiting": "max_queue", "sampling": "sampling"}


def scoring_config(args: argparse.Namespace) -> ScoringConfig:
    """The protocol settings from the command line (validated: a bad value is a one-line error)."""
    template = args.prompt
    if args.dataset is not None:
        if template is not None:
            raise Rank1Error("give --prompt or --dataset, not both")
        template = resolve_dataset(args.dataset)
        logger.info("%s: %s", args.dataset, "the official dataset prompt" if template else "no dataset prompt")
    return ScoringConfig(max_think_tokens=args.max_think_tokens, n_ctx=args.n_ctx, prompt_template=template,
                         rethink_rounds=args.rethink_rounds, protocol=args.protocol,
                         truncate_passages=args.truncate_passages)


def add_scoring_args(p: argparse.ArgumentParser, *, budget: int, n_ctx: int) -> None:
    """The protocol settings' flags (shared by rank1-local and rank1-bench)."""
    p.add_argument("--max-think-tokens", type=int, default=budget,
                   help=f"reasoning budget (default {budget}; official {OFFICIAL_BUDGET})")
    p.add_argument("--n-ctx", type=int, default=n_ctx,
                   help=f"context per pair, prompt + reasoning (default {n_ctx}; official {OFFICIAL_CONTEXT})")
    p.add_argument("--rethink-rounds", type=int, default=0,
                   help="budget forcing: replace </think> with '\\nWait' this many times")
    p.add_argument("--prompt", default=None, help="dataset prompt template containing FILL_QUERY_HERE")
    p.add_argument("--dataset", default=None, metavar="TASK[/SUBSET]",
                   help="use the official evaluation's prompt for an MTEB task, e.g. SciFact or BrightRetrieval/aops "
                        "(any case); an unknown name is refused with the close matches; "
                        f"'{NO_PROMPT}': no dataset prompt, on purpose")
    p.add_argument("--protocol", choices=PROTOCOLS, default="official",
                   help="official: the official code's rules (stop strings, top-20 answer, fallback); full: the "
                        "answer from the full distribution right after </think>")
    p.add_argument("--truncate-passages", action="store_true",
                   help="cut passages to fit prompt + budget in the context (default: as the official code, a "
                        "prompt longer than the context is not run and scores 0.5)")


@dataclass(frozen=True)
class BackendChoice:
    """The backend the command line chose, its settings (checked), and what it opens the model with."""

    spec: BackendSpec
    settings: Any
    cache: Path | None = None
    gguf_type: str | None = None
    card: str | None = None

    def open(self, model: str | Path, config: ScoringConfig) -> Reranker:
        return self.spec.open(model, config, self.settings, cache=self.cache, gguf_type=self.gguf_type,
                              card=self.card)


def backend_choice(args: argparse.Namespace, config: ScoringConfig | None = None, **defaults: Any) -> BackendChoice:
    """The chosen backend's settings from the command line, checked before anything loads: a flag the backend does
    not take is an error naming it, and (with ``config``) the settings must suit the protocol settings (llama.cpp: its
    KV cache must fit llama.cpp's context size). ``defaults``: the command's own defaults for settings the backend
    has."""
    spec = backend_spec(args.backend)
    cache = cache_path(args)
    if cache is not None and not spec.supports_cache:
        raise Rank1Error(f"--cache: the judgment cache keys on the GGUF file: llama.cpp backend only (not "
                         f"{args.backend})")
    gguf_type = getattr(args, "gguf_type", None)
    if gguf_type is not None and not spec.takes_gguf_type:
        raise Rank1Error(f"--gguf-type picks a GGUF for llama.cpp; the {args.backend} backend runs checkpoints")
    values = {name: getattr(args, attr, None) for name, attr in SETTING_FLAGS.items()}
    if values["enable_prefix_caching"] is False:  # a store_true flag not given
        values["enable_prefix_caching"] = None
    known = {f.name for f in fields(spec.settings_type)}
    given = ["--" + SETTING_FLAGS[name].replace("_", "-") for name, value in values.items()
             if value is not None and name not in known]
    if given:
        raise Rank1Error(f"{', '.join(given)}: not a setting of the {args.backend} backend")
    for name, value in defaults.items():
        if name in known and values.get(name) is None:
            values[name] = value
    settings = spec.settings(**values)
    check = getattr(settings, "check_config", None)
    if config is not None and check is not None:
        check(config)
    card = getattr(args, "card", None)
    if card is not None:
        card_named(card)  # an unknown card is refused before anything loads, naming the cards
    return BackendChoice(spec, settings, cache, gguf_type, card)


def prefilter_choice(args: argparse.Namespace, config: ScoringConfig) -> tuple[BackendChoice, ScoringConfig] | None:
    """``--prefilter MODEL --keep N``: the prefilter's backend and settings (the engine flags the main model was given,
    where its backend has them) and its protocol settings (:func:`~rank1_local.pipeline.cascade.prefilter_config`),
    checked before anything loads; None without ``--prefilter``."""
    from rank1_local.pipeline.cascade import check_keep, prefilter_config

    prefilter, keep = getattr(args, "prefilter", None), getattr(args, "keep", None)
    if prefilter is None:
        if keep is not None:
            raise Rank1Error("--keep goes with --prefilter MODEL (a fast reranker that scores every document first)")
        return None
    if keep is None:
        raise Rank1Error("--prefilter needs --keep N: how many of the prefilter's best documents per query rank1 "
                         "reasons over")
    check_keep(keep)
    if getattr(args, "ray", None) is not None:
        raise Rank1Error("--prefilter does not run on Ray yet: leave out --ray, or rerank on Ray without a prefilter")
    spec = backend_spec(args.prefilter_backend)
    known = {f.name for f in fields(spec.settings_type)}
    values = {name: getattr(args, attr, None) for name, attr in SETTING_FLAGS.items() if name in known}
    if values.get("enable_prefix_caching") is False:
        values["enable_prefix_caching"] = None
    settings = spec.settings(**values)
    first_config = prefilter_config(config)
    check = getattr(settings, "check_config", None)
    if check is not None:
        check(first_config)
    card = getattr(args, "prefilter_card", None)
    if card is not None:
        card_named(card)
    return BackendChoice(spec, settings, card=card), first_config


def open_model(args: argparse.Namespace, config: ScoringConfig, choice: BackendChoice | None = None) -> Reranker:
    """The model the command line names: ``--model`` on its backend, or with ``--prefilter`` the cascade of the
    prefilter and it (:class:`~rank1_local.pipeline.cascade.Cascade`)."""
    choice = choice or backend_choice(args, config)
    prefilter = prefilter_choice(args, config)
    if prefilter is None:
        return choice.open(args.model, config)
    from rank1_local.pipeline.cascade import Cascade

    first = prefilter[0].open(args.prefilter, prefilter[1])
    try:
        model = choice.open(args.model, config)
    except BaseException:
        first.close()
        raise
    return Cascade(first, model, args.keep, prefilter_name=str(args.prefilter))


def apply_verify(args: argparse.Namespace) -> None:
    """``--verify always``: this process hashes model files on every use (as ``RANK1_LOCAL_VERIFY=always``)."""
    if getattr(args, "verify", None) is not None:
        os.environ[VERIFY_ENV] = args.verify
    verify_mode()  # a bad value in the environment is an error now, before anything loads


def _rerank_query(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rank1_local.core.pairs import Pair
    from rank1_local.runs.inputs import read_documents

    config = scoring_config(args)
    choice = backend_choice(args, config)
    prefilter_choice(args, config)
    ids, docs = read_documents(args.docs)
    judged: list[Rank1Result] = []

    def on_result(result: Rank1Result) -> None:
        judged.append(result)
        bar.update(1)

    with open_model(args, config, choice) as model:
        with tqdm(total=len(docs), unit="doc", disable=args.quiet, file=sys.stderr) as bar:
            try:
                results = model.score_pairs([Pair(args.query, d, args.instruction) for d in docs],
                                            on_result=on_result)
            except KeyboardInterrupt:
                bar.close()
                return _interrupted_ranking(args, list(judged), ids, docs)
        print_results(ranked(results, args.top_k), ids, docs, args.format, qid=args.qid)
        logger.info("ran on %s", model.device)
    return 0


def _interrupted_ranking(args: argparse.Namespace, judged: list[Rank1Result], ids: list[str], docs: list) -> int:
    """Ctrl-C during ``rerank --docs``: nothing is kept on disk, so print the passages judged so far, ranked and
    marked partial (the table says so on its first line; json, jsonl and trec stay valid and stderr says so)."""
    if not judged:
        print(f"interrupted: none of the {len(docs)} passages was judged; nothing to show (nothing is kept: "
              "--docs prints its ranking, run it again to rank them)", file=sys.stderr)
        return 130
    note = (f"PARTIAL ranking: {len(judged)} of {len(docs)} passages judged before the interrupt; the other "
            f"{len(docs) - len(judged)} are missing")
    if args.format == "table":
        print(note)
    print_results(ranked(judged, args.top_k), ids, docs, args.format, qid=args.qid)
    print(f"interrupted: {note} (nothing is kept: --docs prints its ranking, run it again for all of them)",
          file=sys.stderr)
    return 130


def _rerank_pairs(args: argparse.Namespace) -> int:
    from rank1_local.runs.run_file import score_pairs_file

    if args.output is None:
        raise Rank1Error("--pairs needs --output OUT.jsonl")
    config = scoring_config(args)
    choice = backend_choice(args, config)
    cascade = prefilter_choice(args, config) is not None
    settings = config.to_dict() | ({"prefilter": str(args.prefilter), "keep": args.keep} if cascade else {})
    score_pairs_file(args.pairs, args.output, lambda: open_model(args, config, choice), model_arg=str(args.model),
                     backend=args.backend, settings=settings, progress=not args.quiet,
                     force_resume=args.force_resume)
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    check_top_k(args.top_k, "--top-k")
    if args.force_resume and args.output is None:
        raise Rank1Error("--force-resume goes with --pairs … --output OUT.jsonl")
    apply_verify(args)
    if args.pairs is not None or args.ray is not None:  # Ctrl-C: the run file keeps its rows (--docs: see below)
        args.interrupted = PAIRS_INTERRUPTED
    if uses_ray(args):
        from rank1_local.cli.ray_commands import rerank_on_ray

        config = scoring_config(args)
        prefilter_choice(args, config)  # refused on Ray
        return rerank_on_ray(args, config, backend_choice(args, config))
    if args.pairs is not None:
        if args.query is not None or args.docs is not None:
            raise Rank1Error("give --pairs PAIRS.jsonl --output OUT.jsonl, or --query and --docs, not both")
        return _rerank_pairs(args)
    if args.query is None or args.docs is None:
        raise Rank1Error("give --query and --docs, or --pairs PAIRS.jsonl --output OUT.jsonl")
    if args.output is not None:
        raise Rank1Error("--output goes with --pairs (with --docs the ranking is printed: redirect it to a file)")
    return _rerank_query(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from rank1_local.core.extras import require

    apply_verify(args)
    require("fastapi", "server", "rank1-local serve")
    require("uvicorn", "server", "rank1-local serve")
    from rank1_local.server.app import ServerSettings
    from rank1_local.server.auth import API_KEY_ENV
    from rank1_local.server.run import check_binding, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_binding(args.host, api_key, args.insecure_no_auth)
    config = scoring_config(args)
    choice = backend_choice(args, config, parallel=SERVE_PARALLEL)
    prefilter_choice(args, config)
    server = dict(api_key=api_key, max_documents=args.max_documents, max_total_chars=args.max_chars,
                  max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                  read_timeout=args.read_timeout, max_connections=args.max_connections, ui=not args.no_ui)
    ServerSettings(model_name=args.name or "-", **server)  # checked before the model loads
    if args.max_queue < args.max_documents:
        logger.warning("--max-queue %d is less than --max-documents %d: a request with more than %d documents to "
                       "score is refused (413)", args.max_queue, args.max_documents, args.max_queue)
    if uses_ray(args):
        from rank1_local.cli.ray_commands import serve_on_ray

        return serve_on_ray(args, config, choice, {"model_name": args.name, **server})
    with open_model(args, config, choice) as model:
        serve(model, ServerSettings(model_name=args.name or model.model_path.stem, **server), host=args.host,
              port=args.port)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """``rank1-local demo`` is the toolchain's ``rank1-quantize demo``, run as a program: the demo builds and exports a
    fixture, which is the toolchain's work, and the runtime never imports the toolchain (benchmarks -> quantize ->
    rank1_local); both are installed together."""
    if importlib.util.find_spec("quantize") is None:
        raise Rank1Error("rank1-local demo runs rank1-quantize demo, which is not installed here: install rank1-local "
                         "from its source (pip install -e .), which brings both")
    command = [sys.executable, "-m", "quantize.cli", *(["-q"] if args.quiet else []), "demo"]
    return subprocess.run(command).returncode


def add_backend_args(p: argparse.ArgumentParser, *, parallel: int, parallel_help: str) -> None:
    """The backend and each backend's engine flags (a flag the chosen backend does not take is refused)."""
    p.add_argument("--backend", choices=BACKENDS, default="llama.cpp", help="the library that runs the model")
    p.add_argument("--card", default=None, metavar="|".join(CARDS),
                   help="the model's card (its prompt, answers, and whether it reasons first): "
                        + "; ".join(f"{c.name}: {c.description}" for c in CARDS.values())
                        + " (default: recognised from the model's metadata and name)")
    p.add_argument("--device", default=None, help="transformers: cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--dtype", default=None, help="transformers: auto (fp16 on CUDA, fp32 on CPU), float32, "
                   "float16, bfloat16; vllm: float16 (the official dtype, default), float32, bfloat16")
    p.add_argument("--prefix-caching", action="store_true",
                   help="vllm: enable vLLM's prefix caching (off by default, as in the official code)")
    p.add_argument("--gguf-type", default=None, help="llama.cpp: GGUF type to fetch for a hub id (default Q8_0 up to "
                                                      "3B, else Q4_K_M)")
    p.add_argument("--parallel", type=int, default=None, help=f"llama.cpp: {parallel_help} (default: {parallel})")
    p.add_argument("--n-gpu-layers", type=int, default=None, help="llama.cpp: 0 = CPU, -1 = all layers (default 0)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp: CPU threads (default: the cores other processes leave free, re-read every second)")
    p.add_argument("--sampling", choices=("auto", "host", "device"), default=None,
                   help="llama.cpp: where each row's greedy token and top 20 are found: host (from the full logits), "
                        "device (a top-20 sampler in llama.cpp's graph, no full row copied), auto (device with GPU "
                        "layers, host on the CPU; default); the scores are the same")
    p.add_argument("--prefilter", default=None, metavar="MODEL",
                   help="a fast reranker (e.g. a Qwen3-Reranker GGUF) that scores every document first; rank1 then "
                        "reasons only over its best --keep per query, and the rest keep the prefilter's order below "
                        "them (each row says which stage scored it)")
    p.add_argument("--keep", type=int, default=None, metavar="N",
                   help="with --prefilter: documents per query rank1 reasons over")
    p.add_argument("--prefilter-backend", choices=BACKENDS, default="llama.cpp",
                   help="the library that runs the prefilter (default llama.cpp; it takes the engine flags above "
                        "that its backend has, and the context rank1's prompt has beside its budget: n-ctx minus "
                        "max-think-tokens)")
    p.add_argument("--prefilter-card", default=None, metavar="|".join(CARDS),
                   help="the prefilter's card (default: recognised from its metadata and name)")
    p.add_argument("--verify", choices=VERIFY_MODES, default=None,
                   help="how a model file's SHA-256 (bundle check, judgment cache key) is known: memo "
                   "(hashed once, then remembered while the file stays the same file: same path, size, times, inode) "
                   f"or always (hashed on every start); default: ${VERIFY_ENV}, else memo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rank1-local", description=plain_text(__doc__), formatter_class=HelpFormatter)
    add_common_flags(parser)
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_subcommand(sub, "rerank", help="rerank passages for a query, or score a pairs file")
    p.add_argument("--model", required=True, help="a .gguf file, a bundle folder, or a hub id with a published "
                   "GGUF; with --backend transformers|vllm a checkpoint folder or hub id (unquantized, AWQ or GPTQ)")
    p.add_argument("--query", help="the query (with --docs)")
    p.add_argument("--instruction", default=None, help="appended to the query, as the official code does")
    p.add_argument("--docs", type=Path, help="the passages: .txt (one per line; blank lines skipped, ids count "
                   "passages from 0), .jsonl (text[, title, docid]) or .tsv (docid<TAB>text[<TAB>title], no "
                   "quoting); any other file is read as .txt, with a warning")
    p.add_argument("--qid", default="q1", help="query id in --format trec")
    p.add_argument("--format", choices=["table", "json", "jsonl", "trec"], default="table",
                   help="--docs output: a table; json (one list) or jsonl (one row per line) with rank, docid, "
                        "score, reasoning and flags; trec run lines")
    p.add_argument("--top-k", type=int, default=None, help="print only the best K (default: every document)")
    p.add_argument("--pairs", type=Path, help='JSONL rows {"qid","query","docid","text"[,"title","instruction"]}')
    p.add_argument("--output", type=Path, help="with --pairs: JSONL results, appended as pairs finish; re-running "
                   "resumes (with the same model and settings)")
    p.add_argument("--force-resume", action="store_true",
                   help="with --output: keep rows that have no header to check them against (a run killed before "
                        "rank1-local wrote headers first); they are not checked against this model and settings")
    add_backend_args(p, parallel=4, parallel_help="pairs decoded together")
    add_cache_arg(p)
    add_scoring_args(p, budget=1024, n_ctx=4096)
    add_ray_rerank_args(p)
    p.set_defaults(func=_cmd_rerank)

    p = add_subcommand(sub, "serve", help="serve POST /v1/rerank (Cohere/Jina/TEI shapes) with one continuous batch "
                                          "across requests (pip install 'rank1-local[server]')")
    p.add_argument("--model", required=True, help="a .gguf file, a bundle folder, or a hub id with a published "
                   "GGUF; with --backend transformers|vllm a checkpoint folder or hub id")
    p.add_argument("--name", default=None, help="the model name clients see (default: the file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set RANK1_LOCAL_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without an API key (trusted networks only)")
    p.add_argument("--max-documents", type=int, default=1000, help="documents per request (more: 413)")
    p.add_argument("--max-chars", type=int, default=2_000_000,
                   help="characters of query and documents per request (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="request body size (more: 413)")
    p.add_argument("--max-queue", type=int, default=4096,
                   help="pairs that may wait for a slot, across all requests (a request that would exceed it: 503 "
                        "with Retry-After; one with more pairs than this at all: 413)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at once; more are answered 503 at once")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client gets to send a request's headers, and again its body (then 408 and the "
                        "connection is closed); also how long an idle keep-alive connection stays open")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish on shutdown before they are cancelled")
    p.add_argument("--no-ui", action="store_true",
                   help="no playground page at / (by default / serves a page to try the model in a browser)")
    add_backend_args(p, parallel=SERVE_PARALLEL, parallel_help="pairs decoded together, across all requests")
    add_scoring_args(p, budget=1024, n_ctx=4096)
    add_cache_arg(p)
    add_ray_serve_args(p)
    p.set_defaults(func=_cmd_serve, interrupted="stopped: the server has shut down", interrupt_code=0)

    add_cache_parser(sub)
    add_bundle_commands(sub)
    p = add_subcommand(sub, "demo", help=DEMO_HELP)
    p.set_defaults(func=_cmd_demo)
    return parser


DEMO_HELP = ("see it work, with no hub and no torch: rebuild a tiny fixture model from the weights in this repository "
             "(not a rank1 model), export it to GGUF, check it on llama.cpp and rerank three passages, saying what each "
             "step did and how long it took (rank1-quantize demo; the first run needs the package index once, for "
             "llama.cpp's tokenizer files)")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), "interrupted")


if __name__ == "__main__":
    sys.exit(main())
