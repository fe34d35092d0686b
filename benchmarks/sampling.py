"""Where each decode step's time goes, host against device sampling, side by side with another checkout's runtime.

For each model and ``--parallel``, three loops score the same pairs, each in a fresh process, taking turns (A, B, C,
A, B, C …) so a slow spell on the machine hits them all; the fastest run of each is reported:

- ``baseline``: the runtime of another checkout (``--baseline-src``: a folder holding its ``rank1_local``, e.g. a
  ``git worktree`` of an earlier commit), as it scores;
- ``host``: this runtime, each row's greedy token found in the full logits (a view: nothing copied);
- ``device``: this runtime, a top-20 sampler chain in llama.cpp's graph (20 candidates cross to the host).

For this runtime the step is broken down: time inside ``llama_decode``, reading the rows out, and the rest (the
scheduler and the pair decoders: on host rows, the argmax over the vocabulary).

    python -m benchmarks.sampling --baseline-src ../base [--models behaving,rank1-0.5b-shape] [--parallel 8,16]
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
ROOT = HERE.parent


def load_pairs(name: str, n: int) -> list[tuple[str, str]]:
    if name == "behaving":
        from quantize.fixtures.synthetic_task import eval_pairs

        pairs = eval_pairs()
        return [(p.query, p.passage) for p in (pairs * (n // len(pairs) + 1))[:n]]
    from quantize.calibration import load_calibration

    cal = load_calibration()
    return [(cal[i % 4].query, cal[(i * 7) % len(cal)].text) for i in range(n)]


def worker(args: argparse.Namespace) -> None:
    from rank1_local import Rank1

    pairs = load_pairs(args.model_name, args.pairs)
    kwargs = {} if args.sampling == "baseline" else {"sampling": args.sampling}
    with Rank1(args.model, parallel=args.parallel_one, max_think_tokens=args.budget, n_ctx=1024,
               threads=args.threads, **kwargs) as m:
        m.score_pairs(pairs[:args.parallel_one])  # warm-up
        owner = m._owner
        timings = getattr(owner, "timings", None)
        before = (timings.steps, timings.rows, timings.decode_seconds, timings.readout_seconds) if timings else None
        start = time.perf_counter()
        results = m.score_pairs(pairs)
        seconds = time.perf_counter() - start
    row = {"seconds": seconds, "pairs": len(results), "generated": sum(r.n_tokens for r in results),
           "scores": [r.score for r in results], "reasoning": [r.reasoning for r in results]}
    if timings is not None:
        steps, rows, dec, read = (a - b for a, b in zip(
            (timings.steps, timings.rows, timings.decode_seconds, timings.readout_seconds), before))
        row.update(steps=steps, rows=rows, decode_seconds=dec, readout_seconds=read)
    print(json.dumps(row))


def measure(args: argparse.Namespace, model_name: str, model: Path, parallel: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {k: [] for k in args.loops}
    for _ in range(args.repeat):
        for loop in args.loops:
            src = args.baseline_src if loop == "baseline" else ROOT
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
            cmd = [sys.executable, str(HERE / "sampling.py"), "--worker", "--sampling", loop, "--model", str(model),
                   "--model-name", model_name, "--pairs", str(args.pairs), "--budget", str(args.budget),
                   "--parallel-one", str(parallel), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src)
            if out.returncode:
                raise SystemExit(f"{loop} failed:\n{out.stderr[-2000:]}")
            runs[loop].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {loop: min(done, key=lambda r: r["seconds"]) for loop, done in runs.items()}
    for loop, done in runs.items():
        best[loop]["repeats"] = [round(r["seconds"], 3) for r in done]
    return best


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Host against device sampling, and against the baseline runtime",
        "",
        f"{args.pairs} pairs per run, reasoning budget {args.budget}, {args.threads} threads on "
        f"`{platform.processor() or platform.machine()}` ({os.cpu_count()} cores), CPU only; best of {args.repeat} "
        "runs per row, each in a fresh process, the loops taking turns. The baseline is "
        f"`{args.baseline_label}` (the runtime before this change: every row's full logits copied into numpy, "
        "`argmax` there, the top 20 by a float64 log-softmax over the vocabulary). Per step (one `llama_decode` "
        "call for every slot): the time inside `llama_decode`, reading the rows out, and the rest (the scheduler "
        "and the pair decoders, including the argmax over the vocabulary on host rows). Load average "
        f"{args.load}.",
        "",
        "| model | parallel | loop | pairs/s | vs baseline | ms/step | llama_decode ms/step | readout ms/step | "
        "scheduler + decoders ms/step | same chains and scores as baseline |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = r["loops"]["baseline"]
        for loop, m in r["loops"].items():
            rate = m["pairs"] / m["seconds"]
            speedup = rate / (base["pairs"] / base["seconds"])
            same = m["reasoning"] == base["reasoning"]
            dscore = max(abs(a - b) for a, b in zip(m["scores"], base["scores"]))
            if "steps" in m and m["steps"]:
                per = 1e3 / m["steps"]
                step, dec, read = m["seconds"] * per, m["decode_seconds"] * per, m["readout_seconds"] * per
                cols = f"{step:.2f} | {dec:.2f} | {read:.3f} | {step - dec - read:.2f}"
            else:
                cols = "| | |"
            lines.append(f"| {r['model']} | {r['parallel']} | {loop} | {rate:.2f} | {speedup:.2f}× | {cols} | "
                         f"{'yes' if same else 'NO'}, max Δscore {dscore:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, help="a checkout whose rank1_local is the baseline")
    parser.add_argument("--baseline-label", default="the previous release")
    parser.add_argument("--models", default="behaving,rank1-0.5b-shape")
    parser.add_argument("--parallel", default="8,16")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--budget", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sampling.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sampling", default="host", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-name", default="behaving", help=argparse.SUPPRESS)
    parser.add_argument("--parallel-one", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.baseline_src is None:
        parser.error("--baseline-src is required")
    from benchmarks.fixture_gguf import fixture_gguf
    from rank1_local.runs.atomic import write_text_atomic

    args.loops = ["baseline", "host", "device"]
    args.load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for name in args.models.split(","):
        model = fixture_gguf(name)
        for parallel in (int(p) for p in args.parallel.split(",")):
            rows.append({"model": name, "parallel": parallel, "loops": measure(args, name, model, parallel)})
            print(render(rows, args), flush=True)
    args.load += " → " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    write_text_atomic(args.out, render(rows, args))
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
