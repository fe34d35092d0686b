"""Qwen3-Reranker on ours and on llama.cpp's own ``llama-server --reranking``: the same pairs, the same GGUF, the same
engine settings; pairs/s and how far the scores are apart.

The GGUF is the qwen3-reranker-behaving fixture converted by llama.cpp's own converter (float32). The pairs are the
fixture's evaluation pairs, each query's passages repeated ``--copies`` times (copies after the first end in
" (copy N)", so no prompt is ever the same twice: neither side's prompt cache can answer a pair from an earlier one).
Each query is one call: one ``POST /v1/rerank`` to llama-server, one ``rerank(query, passages)`` to ours. Both run
``--parallel`` slots, ``--threads`` threads and ``--batch`` tokens per ``llama_decode`` (llama-server's micro-batch
too). The sides take turns (theirs, ours, theirs, ours, ...), each run in a fresh server or a fresh process, after a
warm-up call that is not timed; a side's figure is its best run. The scores of the last runs are compared with each
other and, with torch and transformers installed, with the independent re-typing of the official card's code
(tests/qwen3_reranker_reference.py).

    python -m benchmarks.llama_server build        # once
    python -m benchmarks.qwen3_peer [--copies 4] [--parallel 8] [--threads 2] [--batch 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rank1_local.core.cards import QWEN3_INSTRUCTION, QWEN3_SUFFIX, QWEN3_SYSTEM

HERE = Path(__file__).resolve().parent
FIXTURE = "qwen3-reranker-behaving"
N_CTX = 512  # per pair (ours) and per slot (llama-server's context is this times the slots)


def grouped_pairs(copies: int) -> list[tuple[str, list[str]]]:
    """Each evaluation query with its passages, the passages repeated ``copies`` times, every copy's text distinct."""
    from quantize.fixtures.synthetic_task import eval_pairs

    by_query: dict[str, list[str]] = {}
    for pair in eval_pairs():
        by_query.setdefault(pair.query, []).append(pair.passage)
    return [(query, [p if n == 0 else f"{p} (copy {n})" for n in range(copies) for p in passages])
            for query, passages in by_query.items()]


def ours(model: Path, groups: list[tuple[str, list[str]]], args: argparse.Namespace) -> dict:
    """Our runtime, in this process: seconds for every group, and the scores in the groups' order."""
    from rank1_local import open_reranker
    from rank1_local.core.config import ScoringConfig

    config = ScoringConfig(n_ctx=N_CTX, max_think_tokens=32)
    with open_reranker("llama.cpp", model, config, threads=args.threads, parallel=args.parallel,
                       n_batch=args.batch, card="qwen3-reranker") as reranker:
        reranker.rerank("warm-up", ["a passage that is not timed"])
        start = time.perf_counter()
        ranked = [reranker.rerank(query, passages) for query, passages in groups]
        seconds = time.perf_counter() - start
    scores = []
    for results in ranked:
        scores.extend(r.score for r in sorted(results, key=lambda r: r.index))
    return {"seconds": seconds, "scores": scores}


def theirs(model: Path, groups: list[tuple[str, list[str]]], args: argparse.Namespace) -> dict:
    """A fresh ``llama-server --reranking``: seconds for every group (one request each), and the scores."""
    from benchmarks.llama_server import LlamaServer, ServerOptions

    options = ServerOptions(threads=args.threads, ctx_size=N_CTX * args.parallel, batch_size=args.batch,
                            parallel=args.parallel)
    with LlamaServer(model, options=options) as server:
        server.rerank("warm-up", ["a passage that is not timed"])
        start = time.perf_counter()
        scores = [s for query, passages in groups for s in server.rerank(query, passages)]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "scores": scores}


def run_ours(model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.qwen3_peer", "--worker", "--model", str(model),
           "--copies", str(args.copies), "--parallel", str(args.parallel), "--threads", str(args.threads),
           "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_scores(groups: list[tuple[str, list[str]]]) -> list[float] | None:
    """The independent re-typing of the card's code on the fixture checkpoint, or None without torch/transformers."""
    try:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from qwen3_reranker_reference import Qwen3RerankerReference
    except ImportError:
        return None
    finally:
        sys.path.pop(0)
    from quantize.fixtures import build_fixture

    reference = Qwen3RerankerReference(build_fixture(FIXTURE))
    return [float(s) for s in reference.scores([(q, p) for q, passages in groups for p in passages], None)]


POOLING_MODES = {"rank pooling (every position)": "rank", "last position only": "last"}


def first_prompt(groups: list[tuple[str, list[str]]]) -> str:
    """The card's prompt for the first query and its first passage, under the default instruction."""
    query, passages = groups[0]
    return (QWEN3_SYSTEM + f"<Instruct>: {QWEN3_INSTRUCTION}\n<Query>: {query}\n<Document>: {passages[0]}"
            + QWEN3_SUFFIX)


def pooling_seconds(model: Path, prompt: str, mode: str, threads: int, tries: int = 5) -> dict:
    """One prompt evaluated by llama.cpp (llama-cpp-python, in this process) as llama-server's rerank runs it (mode
    ``rank``: embedding mode with rank pooling, where every position is an output, so the graph's vocabulary-wide
    output layer runs at each one) or as we run it (``last``: the last position's logits only); best of ``tries``."""
    import llama_cpp

    extra = {"embedding": True, "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_RANK} if mode == "rank" else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=threads,
                          n_threads_batch=threads, verbose=False, **extra)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        best = float("inf")
        for _ in range(tries):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - start)
    finally:
        llm.close()
    return {"tokens": len(ids), "seconds": best}


def pooling_cost(model: Path, args: argparse.Namespace) -> dict:
    """:func:`pooling_seconds` for each mode, on 1 thread and on ``--threads``, each in a fresh process (one mode's
    context slowed the next one's in the same process)."""
    seconds, tokens = {}, 0
    for threads in dict.fromkeys((1, args.threads)):
        for name, mode in POOLING_MODES.items():
            cmd = [sys.executable, "-m", "benchmarks.qwen3_peer", "--worker-pooling", mode, "--model", str(model),
                   "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            seconds[f"{name}, {threads} thread{'s' if threads > 1 else ''}"], tokens = row["seconds"], row["tokens"]
    return {"prompt_tokens": tokens, "seconds": seconds}


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def measure(args: argparse.Namespace) -> dict:
    from benchmarks.fixture_gguf import llama_cpp_converted_gguf
    from benchmarks.llama_server import built_server

    if built_server() is None:
        raise SystemExit("error: llama-server is not built: python -m benchmarks.llama_server build")
    model = llama_cpp_converted_gguf(FIXTURE)
    groups = grouped_pairs(args.copies)
    n_pairs = sum(len(passages) for _, passages in groups)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"llama-server": [], "ours": []}
    for i in range(args.repeat):
        runs["llama-server"].append(theirs(model, groups, args))
        runs["ours"].append(run_ours(model, args))
        print(f"run {i + 1}: llama-server {n_pairs / runs['llama-server'][-1]['seconds']:.1f} pairs/s, "
              f"ours {n_pairs / runs['ours'][-1]['seconds']:.1f} pairs/s, load {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    rates = {side: [n_pairs / r["seconds"] for r in rs] for side, rs in runs.items()}
    best = {side: max(r) for side, r in rates.items()}
    theirs_scores, our_scores = runs["llama-server"][-1]["scores"], runs["ours"][-1]["scores"]
    one_prompt = pooling_cost(model, args)
    reference = reference_scores(groups)
    return {
        "model": model.name, "pairs": n_pairs, "queries": len(groups), "copies": args.copies,
        "parallel": args.parallel, "threads": args.threads, "batch": args.batch, "n_ctx_per_slot": N_CTX,
        "repeat": args.repeat, "pairs_per_s": best, "runs_pairs_per_s": rates,
        "ours_over_theirs": best["ours"] / best["llama-server"],
        "max_abs_diff": {"ours_vs_llama_server": max_gap(our_scores, theirs_scores),
                         "ours_vs_reference": None if reference is None else max_gap(our_scores, reference),
                         "llama_server_vs_reference": None if reference is None else max_gap(theirs_scores, reference)},
        "one_prompt": one_prompt,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        "llama_cpp_python": _llama_cpp_python_version(), "date": time.strftime("%Y-%m-%d %H:%M %z"),
    }


def _llama_cpp_python_version() -> str:
    from quantize.fixtures.llama_cpp_sdist import llama_cpp_python_version

    return llama_cpp_python_version()


def render(row: dict) -> str:
    gaps = row["max_abs_diff"]

    def gap(key: str) -> str:
        return "not measured (no torch)" if gaps[key] is None else f"{gaps[key]:.2e}"

    def runs(side: str) -> str:
        return ", ".join(f"{r:.1f}" for r in row["runs_pairs_per_s"][side])

    return "\n".join([
        "# Qwen3-Reranker: ours and llama-server --reranking",
        "",
        f"`{row['model']}` (the qwen3-reranker-behaving fixture converted by llama.cpp's own converter, float32), "
        f"{row['pairs']} pairs: {row['queries']} queries, each with its evaluation passages {row['copies']} times "
        f"(every copy's text distinct), one call per query. Both sides: llama.cpp from llama-cpp-python "
        f"{row['llama_cpp_python']}, {row['parallel']} slots, {row['threads']} thread{'s' if row['threads'] > 1 else ''}, batch {row['batch']} tokens, "
        f"{row['n_ctx_per_slot']} tokens of context per slot. Sides in turn, each run in a fresh server or process "
        f"after an untimed warm-up; best of {row['repeat']}. {row['machine']}; load average "
        f"{' / '.join(map(str, row['load_before']))} before, {' / '.join(map(str, row['load_after']))} after "
        f"({row['date']}). Made by `python -m benchmarks.qwen3_peer`.",
        "",
        "| side | pairs/s (best) | runs |",
        "|---|---:|---|",
        f"| llama-server --reranking (/v1/rerank) | {row['pairs_per_s']['llama-server']:.1f} | {runs('llama-server')} |",
        f"| rank1-local (`rerank`, card qwen3-reranker) | {row['pairs_per_s']['ours']:.1f} | {runs('ours')} |",
        "",
        f"Ours / theirs: **{row['ours_over_theirs']:.2f}x**.",
        "",
        "Largest |score difference| over every pair: "
        f"ours vs llama-server {gap('ours_vs_llama_server')}; ours vs the official card's code "
        f"{gap('ours_vs_reference')}; llama-server vs the official card's code {gap('llama_server_vs_reference')}.",
        "",
        "Where the difference comes from: llama-server's rerank runs the context in embedding mode with rank pooling,",
        "where every prompt position is an output, so the model's graph runs its output layer (the whole vocabulary)",
        "at every position and the rank head reads only the last; ours asks for the last position's logits alone, and",
        "evaluates each query's shared prefix (system, instruction, query) once for all its passages. One prompt",
        f"({row['one_prompt']['prompt_tokens']} tokens) evaluated by llama.cpp (llama-cpp-python, a fresh process "
        "each, best of 5) both ways: "
        + "; ".join(f"{mode} {seconds * 1000:.1f} ms" for mode, seconds in row["one_prompt"]["seconds"].items())
        + ". The 1-thread times show the output layer's own cost."
        + (f" On {row['threads']} threads on a shared machine, one prompt's time is mostly threads waiting for a "
           "descheduled peer, and it varies by tens of times between fresh processes; the bigger the step (the "
           "vocabulary-wide layer at every position), the more it waits." if row["threads"] > 1 else ""),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="times each query's passages are repeated")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "qwen3_peer.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-pooling", choices=sorted(POOLING_MODES.values()), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_pooling:
        print(json.dumps(pooling_seconds(args.model, first_prompt(grouped_pairs(1)), args.worker_pooling,
                                         args.threads)))
        return
    if args.worker:
        print(json.dumps(ours(args.model, grouped_pairs(args.copies), args)))
        return
    from rank1_local.runs.atomic import write_text_atomic

    row = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, render(row))
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(row, indent=2) + "\n")
    print(render(row))


if __name__ == "__main__":
    main()
