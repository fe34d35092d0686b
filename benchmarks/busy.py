"""Throughput on a busy machine: how llama.cpp's threads wait, and how many there are, with 0, 1 and 2 busy processes
beside the run (which this benchmark starts itself: pure-Python loops that never sleep, like any CPU-bound job).

Each (load, setting) scores the same pairs in a fresh process (OpenMP reads its settings once, when it loads); the
settings take turns, best of ``--repeat``. Settings: GNU OpenMP's default waiting (spin 300,000 times, then sleep),
OMP_WAIT_POLICY=ACTIVE (spin), OMP_WAIT_POLICY=PASSIVE (sleep at once), and a short spin (GOMP_SPINCOUNT), each with
1 thread, with every core, and with ``auto`` (no thread count given: the runtime's default, which follows the cores
the other processes leave free, ``rank1_local.backends.llama.threads.CoreShare``).

    python -m benchmarks.busy [--pairs 32] [--parallel 8] [--budget 48] [--waiting "GNU default (spin 300k),spin 1k"]
        [--threads 1,all,auto]
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

HERE = Path(__file__).resolve().parent
WAITING = {"GNU default (spin 300k)": {"GOMP_SPINCOUNT": "300000"}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
           "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin 10k": {"GOMP_SPINCOUNT": "10000"},
           "spin 100k": {"GOMP_SPINCOUNT": "100000"}, "spin 1k": {"GOMP_SPINCOUNT": "1000"},
           "spin 3k": {"GOMP_SPINCOUNT": "3000"}}
BUSY = "while True: pass"


def worker(args: argparse.Namespace) -> None:
    from quantize.fixtures.synthetic_task import eval_pairs
    from rank1_local import Rank1

    pairs = [(p.query, p.passage) for p in eval_pairs()][:args.pairs]
    threads = None if args.threads_one == "auto" else int(args.threads_one)
    with Rank1(args.model, parallel=args.parallel, max_think_tokens=args.budget, n_ctx=512, threads=threads) as m:
        m.score_pairs(pairs[:2])
        start = time.perf_counter()
        m.score_pairs(pairs)
        print(json.dumps({"seconds": time.perf_counter() - start, "pairs": len(pairs)}))


def run(args: argparse.Namespace, model: Path, threads: str, waiting: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | waiting
    cmd = [sys.executable, "-m", "benchmarks.busy", "--worker", "--model", str(model), "--pairs", str(args.pairs),
           "--parallel", str(args.parallel), "--budget", str(args.budget), "--threads-one", threads]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=HERE.parent)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return row["pairs"] / row["seconds"]


def measure(args: argparse.Namespace, model: Path) -> list[dict]:
    rows = []
    cores = str(os.cpu_count() or 1)
    threads_each = list(dict.fromkeys(cores if t == "all" else t for t in args.threads))
    for load in args.loads:
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            time.sleep(1.0)
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.repeat):
                for name in args.waiting:
                    waiting = WAITING[name]
                    for threads in threads_each:
                        results.setdefault((name, threads), []).append(run(args, model, threads, waiting))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        best = max(max(v) for v in results.values())
        for (name, threads), rates in results.items():
            rows.append({"load": load, "waiting": name, "threads": threads, "pairs_per_s": max(rates),
                         "runs": rates, "vs_best": max(rates) / best})
        print(json.dumps(rows[-len(results):]), flush=True)
    return rows


def render(rows: list[dict], args: argparse.Namespace) -> str:
    loads = sorted({r["load"] for r in rows})
    settings = list(dict.fromkeys((r["waiting"], r["threads"]) for r in rows))
    by = {(r["load"], r["waiting"], r["threads"]): r for r in rows}
    lines = [
        "# Throughput on a busy machine",
        "",
        f"The behaving fixture (Q8_0), {args.pairs} pairs, parallel {args.parallel}, reasoning budget {args.budget}, "
        f"on `{platform.processor() or platform.machine()}` ({os.cpu_count()} cores), CPU only. Beside each run, 0, 1 "
        "or 2 busy processes (pure-Python loops) started by the benchmark; each cell is pairs/s, best of "
        f"{args.repeat} runs in fresh processes, and in brackets its share of the best setting at that load. "
        f"Load average before: {args.load_before}.",
        "",
        "| waiting | threads | " + " | ".join(f"{n} busy" for n in loads) + " |",
        "|---|---:|" + "---:|" * len(loads),
    ]
    for waiting, threads in settings:
        cells = [f"{by[(n, waiting, threads)]['pairs_per_s']:.2f} ({by[(n, waiting, threads)]['vs_best']:.2f})"
                 for n in loads]
        lines.append(f"| {waiting} | {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--budget", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--loads", default="0,1,2")
    parser.add_argument("--waiting", default=",".join(WAITING), help=f"of: {', '.join(WAITING)}")
    parser.add_argument("--threads", default="1,all,auto", help="thread counts: numbers, all (every core), auto")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "busy.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads-one", default="1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from benchmarks.fixture_gguf import fixture_gguf
    from rank1_local.runs.atomic import write_text_atomic

    args.loads = [int(n) for n in args.loads.split(",")]
    args.waiting, args.threads = args.waiting.split(","), args.threads.split(",")
    unknown = [w for w in args.waiting if w not in WAITING]
    if unknown:
        parser.error(f"unknown --waiting {', '.join(unknown)}; choose from {', '.join(WAITING)}")
    args.load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = measure(args, fixture_gguf("behaving"))
    write_text_atomic(args.out, render(rows, args))
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print(render(rows, args))


if __name__ == "__main__":
    main()
