"""Crash recovery: SIGKILL ``rank1-local serve --cache`` mid-run, restart it, and check the judgment cache.

Clients keep the server busy with requests of distinct pairs; once ``--kill-after`` pairs are scored the server
is killed with SIGKILL (no shutdown, no checkpoint). Then: SQLite's ``integrity_check`` on the cache file, its
row count, and a restarted server on the same cache scoring every pair again: the pairs judged before the kill
come back from the cache (``cached: true``), and every result, cached or not, equals a direct library call.
Usage:
    python -m benchmarks.server_crash [--kill-after 40] [--out benchmarks/results/server_crash.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.fixture_gguf import fixture_gguf
from benchmarks.server_concurrency import TOLERANCE, workload
from benchmarks.server_process import ServerProcess

HERE = Path(__file__).resolve().parent


def pairs_scored(server: ServerProcess) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("rank1_pairs_total "):
            return float(line.split()[1])
    return 0.0


def keep_busy(server: ServerProcess, requests: list[tuple[str, list[str]]], stop: threading.Event) -> None:
    with httpx.Client(timeout=300) as http:
        for query, docs in requests:
            if stop.is_set():
                return
            try:
                http.post(server.url + "/v1/rerank", json={"query": query, "documents": docs})
            except httpx.HTTPError:  # the server was killed under us
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=40, help="pairs scored before the SIGKILL")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "server_crash.md")
    args = parser.parse_args()
    from rank1_local import Rank1

    model = fixture_gguf("behaving", "Q8_0")
    requests = workload(args.queries, args.docs)
    pairs = [(q, d) for q, docs in requests for d in docs]
    with Rank1(model, n_ctx=512, max_think_tokens=64, parallel=8, threads=args.threads) as m:
        expected = {p: (r.score, r.reasoning) for p, r in zip(pairs, m.score_pairs(pairs), strict=True)}
    serve_args = ["--n-ctx", "512", "--max-think-tokens", "64", "--parallel", "8", "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "judgments.sqlite3"
        with ServerProcess(model, serve_args + ["--cache", str(cache)], Path(tmp) / "first.log") as server:
            stop = threading.Event()
            clients = [threading.Thread(target=keep_busy, args=(server, requests[k::4], stop)) for k in range(4)]
            for t in clients:
                t.start()
            while pairs_scored(server) < args.kill_after:
                time.sleep(0.05)
            server.kill()
            scored_before_kill = args.kill_after
            stop.set()
            for t in clients:
                t.join()
        files = sorted(p.name for p in Path(tmp).iterdir() if p.name.startswith("judgments"))
        with sqlite3.connect(cache) as db:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            table = next(t for t in tables if "judg" in t)
            rows_after = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        with ServerProcess(model, serve_args + ["--cache", str(cache)], Path(tmp) / "second.log") as server:
            cached = mismatched = 0
            max_delta = 0.0
            with httpx.Client(timeout=300) as http:
                for query, docs in requests:
                    body = http.post(server.url + "/v1/rerank", json={"query": query, "documents": docs,
                                                                      "return_reasoning": True}).json()
                    for row in body["results"]:
                        score, reasoning = expected[(query, docs[row["index"]])]
                        delta = abs(row["relevance_score"] - score)
                        max_delta = max(max_delta, delta)
                        cached += row["cached"]
                        mismatched += row["reasoning"] != reasoning or delta > TOLERANCE
    result = {"pairs": len(pairs), "scored_before_kill": scored_before_kill, "files_after_kill": files,
              "integrity_check": integrity, "rows_after_restart": rows_after, "cached_on_rerun": cached,
              "mismatched": mismatched, "max_abs_delta": max_delta}
    text = "\n".join([
        "# Crash recovery of the judgment cache",
        "",
        f"`rank1-local serve --cache` (`behaving` fixture, Q8_0, 8 slots) scoring {len(pairs)} distinct pairs for 4 "
        f"clients was killed with SIGKILL once its /metrics counted {scored_before_kill} pairs scored. The cache "
        "file was then checked with SQLite, and a restarted server on the same file scored every pair again.",
        "",
        "| | |",
        "|---|---:|",
        f"| files left beside the cache after the kill | {', '.join(files)} |",
        f"| `PRAGMA integrity_check` | {integrity} |",
        f"| rows in the cache after the kill | {rows_after} (≥ {scored_before_kill} pairs scored before it) |",
        f"| results served from the cache by the restarted server | {cached} of {len(pairs)} |",
        f"| results differing from a direct library call (reasoning, or \\|Δscore\\| > {TOLERANCE:g}) | {mismatched} |",
        f"| largest \\|Δscore\\| against the library | {max_delta:.1e} |",
        "",
        "Each judgment is committed on its own as its pair finishes (SQLite WAL), so a kill loses at most the pairs "
        "still being decoded; those are simply scored again after the restart.",
    ]) + "\n"
    from rank1_local.runs.atomic import write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
