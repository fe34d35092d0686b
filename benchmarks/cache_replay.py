"""The judgment cache on a RAG-like trace: hit rate, replay time with and without the cache, and what a hit costs.

A RAG front end sends rerank requests (a query and its retrieved passages). The trace replays requests whose
queries follow a Zipf-like popularity (some are asked again and again), where a "show more" re-render sends the
same query with a longer candidate list (its first passages again), and where related queries (e-waste, health,
education; one paraphrase) retrieve overlapping passages. Only a repeated *(query, passage)* prompt can hit: a
passage that recurs under another query, or under a paraphrase of the query, is a new prompt and is judged again.

The model is the rank1-0.5b-shape fixture (random weights, Q8_0, as in ``benchmarks/speed.py``): every pair
generates exactly ``--budget`` tokens, so a judgment costs what a real one of that length does. Usage:
    python -m benchmarks.cache_replay [--budget 32] [--requests 20] [--model X.gguf] [--out benchmarks/results/cache_replay.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLE = ROOT / "tests" / "data" / "trec_rag24_sample.jsonl"

# topics of related queries: their candidate lists share passages
GROUPS = [["2024-127266", "2024-42497", "2024-41849"],  # e-waste, electronics
          ["2024-105741", "2024-105741-para", "2024-12875"],  # health (with a paraphrase of the WBC query)
          ["2024-121840", "2024-22410"],  # education
          ["2024-219624"]]  # olive oil
PARAPHRASES = {"2024-105741-para": ("2024-105741", "is a white blood cell count above 15,000 dangerous if left "
                                                   "untreated?")}
CANDIDATES = 6  # passages retrieved per query; a first page shows 4


@dataclass(frozen=True)
class Request:
    qid: str
    query: str
    passages: list[str]


def load_corpus() -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """Queries by qid, each query's judged passages, and every passage."""
    from quantize.calibration import load_calibration

    queries: dict[str, str] = {}
    own: dict[str, list[str]] = {}
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        queries[row["qid"]] = row["query"]
        own.setdefault(row["qid"], []).append(row["text"])
    for pair in load_calibration():
        queries[pair.qid] = pair.query
        own.setdefault(pair.qid, []).append(pair.text)
    for qid, (source, text) in PARAPHRASES.items():
        queries[qid] = text
        own[qid] = own[source]
    pool = list(dict.fromkeys(p for passages in own.values() for p in passages))
    return queries, own, pool


def build_trace(n_requests: int, seed: int = 0) -> list[Request]:
    queries, own, pool = load_corpus()
    rng = random.Random(seed)
    candidates: dict[str, list[str]] = {}
    for group in GROUPS:
        shared = [p for qid in group for p in own[qid][:2]]  # related queries retrieve each other's passages
        for qid in group:
            mine = list(dict.fromkeys(own[qid] + shared))
            fill = [p for p in rng.sample(pool, len(pool)) if p not in mine]
            candidates[qid] = (mine + fill)[:CANDIDATES]
    qids = [qid for group in GROUPS for qid in group if qid not in PARAPHRASES]
    order = rng.sample(qids, len(qids))  # the most popular first (not in group order)
    popularity = [1 / (rank + 1) for rank in range(len(order))]
    trace = [Request(qid, queries[qid], candidates[qid][:4]) for qid in order]  # every query asked once
    while len(trace) < n_requests:
        qid = rng.choices(order, weights=popularity)[0]
        k = 4 if rng.random() < 0.6 else CANDIDATES  # first page, or "show more"
        trace.append(Request(qid, queries[qid], candidates[qid][:k]))
    for qid in PARAPHRASES:  # asked again in other words, once, late in the trace
        trace.insert(len(trace) * 3 // 4, Request(qid, queries[qid], candidates[qid][:4]))
    return trace[:max(n_requests, len(order) + len(PARAPHRASES))]


def replay(model_path: str, trace: list[Request], args: argparse.Namespace, cache: Path | None) -> dict:
    from rank1_local import Rank1

    with Rank1(model_path, parallel=args.parallel, threads=args.threads, max_think_tokens=args.budget,
               n_ctx=1024, cache=cache) as model:
        hashing = 0.0
        if cache is not None:
            start = time.perf_counter()
            model.pipeline.scope(model.config)  # the model file's digest: once per file, then remembered by path, size, mtime
            hashing = time.perf_counter() - start
        rows = []
        total = time.perf_counter()
        for request in trace:
            start = time.perf_counter()
            results = model.score_pairs([(request.query, p) for p in request.passages])
            rows.append({"seconds": time.perf_counter() - start, "pairs": len(results),
                         "hits": sum(r.cached for r in results),
                         "judgments": [[r.score, r.reasoning, r.n_tokens, r.forced] for r in results]})
        total = time.perf_counter() - total
    return {"seconds": total, "hashing_seconds": hashing, "requests": rows}


def hit_costs(prompts: list[str], rows: int, reasoning_chars: int, repeat: int) -> dict:
    """What a hit costs, on a cache of ``rows`` judgments with the trace's prompt sizes."""
    from rank1_local.cache.store import JudgmentCache
    from rank1_local.core.pairs import PreparedPair
    from rank1_local.core.results import build_result

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.gguf"
        model.write_bytes(os.urandom(1 << 16))
        cache = JudgmentCache(Path(tmp) / "judgments.sqlite3")
        scope = cache.scope(model, {"max_think_tokens": 1024})
        pairs = [PreparedPair(i, "q", f"{prompts[i % len(prompts)]} #{i}", list(range(300))) for i in range(rows)]
        reasoning = "x" * reasoning_chars
        start = time.perf_counter()
        for p in pairs:
            scope.store(p, build_result(p, score=rng.random(), reasoning=reasoning, n_tokens=reasoning_chars // 4,
                                        forced=False, seconds=1.0))
        store_us = (time.perf_counter() - start) / rows * 1e6

        def per_call(fn, calls: int) -> list[float]:
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e6)
            return times

        picks = [rng.choice(pairs) for _ in range(repeat)]
        it = iter(picks)
        key_us = per_call(lambda: scope.key(next(it).prompt), repeat)
        it = iter(picks)
        single = per_call(lambda: scope.lookup([next(it)]), repeat)
        misses = [PreparedPair(0, "q", f"never stored {i}", [1]) for i in range(repeat)]
        it = iter(misses)
        miss = per_call(lambda: scope.lookup([next(it)]), repeat)
        batch = 20
        batches = [[PreparedPair(k, "q", p.prompt, p.ids) for k, p in enumerate(rng.sample(pairs, batch))]
                   for _ in range(repeat // 10)]
        it = iter(batches)
        batched = per_call(lambda: scope.lookup(next(it)), len(batches))
        assert all(len(scope.lookup(b)) == batch for b in batches[:3])
        cache.close()
        size = (Path(tmp) / "judgments.sqlite3").stat().st_size
    return {"rows": rows, "file_mib": size / 2**20, "prompt_chars": statistics.mean(len(p.prompt) for p in pairs), "store_us": store_us, "key_us": statistics.median(key_us),
            "hit_us": statistics.median(single), "hit_us_p99": sorted(single)[int(0.99 * len(single))],
            "miss_us": statistics.median(miss), "batch": batch,
            "batched_hit_us_per_pair": statistics.median(batched) / batch}


def summarize(trace: list[Request], plain: dict, cached: dict) -> dict:
    pairs = [(r.query, p) for r in trace for p in r.passages]
    passages_by_query: dict[str, set[str]] = {}
    for query, passage in pairs:
        passages_by_query.setdefault(passage, set()).add(query)
    hits = sum(r["hits"] for r in cached["requests"])
    same = total = 0
    for a, b in zip(plain["requests"], cached["requests"], strict=True):
        for x, y in zip(a["judgments"], b["judgments"], strict=True):
            total += 1
            same += struct.pack("<d", x[0]) == struct.pack("<d", y[0]) and x[1:] == y[1:]
    all_hit = [i for i, r in enumerate(cached["requests"]) if r["hits"] == r["pairs"]]
    return {"requests": len(trace), "pairs": len(pairs), "unique_prompts": len(set(pairs)),
            "passages": len(passages_by_query),
            "recurring_passages": sum(len(qs) > 1 for qs in passages_by_query.values()),
            "hits": hits, "hit_rate": hits / len(pairs), "identical": same, "compared": total,
            "all_hit_requests": len(all_hit),
            "all_hit_ms_cached": statistics.median(cached["requests"][i]["seconds"] for i in all_hit) * 1e3
            if all_hit else None,
            "all_hit_ms_plain": statistics.median(plain["requests"][i]["seconds"] for i in all_hit) * 1e3
            if all_hit else None,
            "seconds_plain": plain["seconds"], "seconds_cached": cached["seconds"],
            "hashing_seconds": cached["hashing_seconds"],
            "seconds_per_judgment": plain["seconds"] / len(pairs)}


def render(s: dict, costs: dict, args: argparse.Namespace) -> str:
    speedup = s["seconds_plain"] / s["seconds_cached"]
    lines = [
        "# Judgment cache: RAG-like replay",
        "",
        f"{s['requests']} rerank requests, {s['pairs']} (query, passage) judgments asked for, "
        f"{s['unique_prompts']} distinct prompts; rank1-0.5b-shape fixture (random weights, Q8_0, every pair "
        f"generates exactly {args.budget} tokens), parallel {args.parallel}, {args.threads} threads on "
        f"`{platform.processor() or platform.machine()}` ({os.cpu_count()} cores), CPU only; one run each way, in "
        "one process, the uncached replay first.",
        "",
        "The trace (`benchmarks/cache_replay.py`, seeded): TREC RAG 2024 queries and passages "
        "(`tests/data/trec_rag24_sample.jsonl` and the calibration set); every query is asked once, then "
        "queries are drawn with Zipf-like popularity, each request sending the query's first 4 retrieved "
        f"passages or, as a \"show more\" re-render, all {CANDIDATES}; related queries (e-waste, health, "
        "education) retrieve each other's passages, and one query is asked again as a paraphrase. "
        "**A hit needs the same prompt**: a judgment is of a (query, passage) pair, so a passage that recurs "
        f"under another query is a new prompt and is judged again ({s['recurring_passages']} of the trace's "
        f"{s['passages']} distinct passages appear under more than one query, the paraphrase included). Only "
        "re-asked queries and re-rendered pages hit: the hit rate below is that of this trace's repetition, "
        "not a property of the cache.",
        "",
        "| | no cache | fresh cache |",
        "|---|---:|---:|",
        f"| judgments decoded | {s['pairs']} | {s['pairs'] - s['hits']} |",
        f"| hits (hit rate) | – | {s['hits']} ({s['hit_rate']:.0%}) |",
        f"| replay time | {s['seconds_plain']:.1f} s | {s['seconds_cached']:.1f} s ({speedup:.2f}× faster) |",
    ]
    if s["all_hit_requests"]:
        lines.append(f"| median latency of the {s['all_hit_requests']} requests served wholly from the cache | "
                     f"{s['all_hit_ms_plain']:.0f} ms | {s['all_hit_ms_cached']:.1f} ms |")
    lines += [
        f"| results identical to the uncached replay (score bits, reasoning, tokens, forced) | | "
        f"{s['identical']}/{s['compared']} |",
        "",
        f"Finding the model file's digest took {s['hashing_seconds']:.2f} s (hashing a GGUF happens once per "
        "file; later runs read the digest remembered by path, size and mtime); it is outside the replay time. "
        "A decoded "
        f"judgment cost {s['seconds_per_judgment']:.2f} s on average at this {args.budget}-token budget (real "
        "rank1 chains run to hundreds of tokens, so the saving per hit grows with them).",
        "",
        f"## What a hit costs ({costs['rows']:,} judgments in the file, {costs['file_mib']:.0f} MiB; "
        "medians)",
        "",
        "| operation | µs |",
        "|---|---:|",
        f"| cache key (SHA-256 of digest, settings and the prompt: {costs['prompt_chars']:.0f} characters on "
        f"average, the trace's) | {costs['key_us']:.1f} |",
        f"| lookup of one pair, hit (key, SELECT, result built) | {costs['hit_us']:.1f} "
        f"(p99 {costs['hit_us_p99']:.0f}) |",
        f"| lookup of one pair, miss | {costs['miss_us']:.1f} |",
        f"| lookup of {costs['batch']} pairs, all hits, per pair | {costs['batched_hit_us_per_pair']:.1f} |",
        f"| store of one judgment (its own WAL commit) | {costs['store_us']:.0f} |",
        "",
        "A request served from the cache end to end (table above) also tokenizes its prompts in `prepare_pairs`; "
        "that, not the lookup, is most of its latency.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default=None, help="GGUF to use (default: the rank1-0.5b-shape fixture)")
    parser.add_argument("--rows", type=int, default=20000, help="judgments in the file for the hit-cost timings")
    parser.add_argument("--repeat", type=int, default=2000, help="lookups timed per operation")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache_replay.md")
    parser.add_argument("--render", type=Path, default=None,
                        help="only rewrite --out from an earlier run's JSON file")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        for name in ("budget", "parallel", "threads"):
            setattr(args, name, saved[name])
        write_outputs(args, saved["summary"], saved["hit_costs"])
        return

    trace = build_trace(args.requests)
    from rank1_local.core.prompt import build_prompt

    prompts = list(dict.fromkeys(build_prompt(r.query, p) for r in trace for p in r.passages))
    costs = hit_costs(prompts, args.rows, 1500, args.repeat)
    print(json.dumps(costs), flush=True)
    if args.model is None:
        from benchmarks.fixture_gguf import fixture_gguf

        args.model = str(fixture_gguf("rank1-0.5b-shape"))
    plain = replay(args.model, trace, args, None)
    print(f"no cache: {plain['seconds']:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cached = replay(args.model, trace, args, Path(tmp) / "judgments.sqlite3")
    summary = summarize(trace, plain, cached)
    print(json.dumps(summary), flush=True)
    write_outputs(args, summary, costs)


def write_outputs(args: argparse.Namespace, summary: dict, costs: dict) -> None:
    from rank1_local.runs.atomic import write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, render(summary, costs, args))
    saved = {"summary": summary, "hit_costs": costs, "budget": args.budget, "parallel": args.parallel,
             "threads": args.threads}
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(saved, indent=2) + "\n")
    print(render(summary, costs, args))


if __name__ == "__main__":
    main()
