"""How much a pair's score moves with the batch it is decoded in (llama.cpp's CPU kernels are not batch-invariant).

The same pairs are scored alone (parallel 1: every step a batch of one row) and together at parallel 2, 4, 8 and 16,
for several GGUF types, with the reasoning cut by the budget (every pair forced: the fallback's answer) and closed
within it. Reported per cell: whether every chain is identical, and the largest, 95th-percentile and median
|Δscore| and |Δ log-odds| against the alone run (a score p moves by about p(1 − p) times its log-odds: the same
logit noise moves a score near 0.5 most). With ``--f32-kv`` the KV cache is float32.

    python -m benchmarks.batch_variance [--types F16,Q8_0,Q4_K_M] [--pairs 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def score(model: Path, pairs, budget: int, parallel: int, f32_kv: bool):
    from rank1_local import Rank1

    with Rank1(model, parallel=parallel, max_think_tokens=budget, n_ctx=512, threads=os.cpu_count(),
               f32_kv_cache=f32_kv) as m:
        return m.score_pairs(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="F16,Q8_0,Q4_K_M")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--parallel", default="2,4,8,16")
    parser.add_argument("--budgets", default="8,48", help="budgets: 8 forces every pair, 48 lets them close")
    parser.add_argument("--f32-kv", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "batch_variance.md")
    args = parser.parse_args()
    from benchmarks.fixture_gguf import fixture_gguf
    from quantize.fixtures.synthetic_task import eval_pairs
    from rank1_local.runs.atomic import write_text_atomic

    pairs = [(p.query, p.passage) for p in eval_pairs()][:args.pairs]
    rows = []
    for gguf_type in args.types.split(","):
        model = fixture_gguf("behaving", gguf_type)
        for budget in (int(b) for b in args.budgets.split(",")):
            alone = score(model, pairs, budget, 1, args.f32_kv)
            forced = sum(r.forced for r in alone)
            for parallel in (int(p) for p in args.parallel.split(",")):
                together = score(model, pairs, budget, parallel, args.f32_kv)
                same = all(a.reasoning == b.reasoning and a.forced == b.forced for a, b in zip(alone, together))
                d_score = np.array([abs(a.score - b.score) for a, b in zip(alone, together)])
                d_logit = np.array([abs(logit(a.score) - logit(b.score)) for a, b in zip(alone, together)])
                rows.append({"type": gguf_type, "budget": budget, "forced": forced, "parallel": parallel,
                             "same_chains": same, "max_dscore": float(d_score.max()),
                             "p95_dscore": float(np.percentile(d_score, 95)),
                             "median_dscore": float(np.median(d_score)), "max_dlogit": float(d_logit.max()),
                             "p95_dlogit": float(np.percentile(d_logit, 95))})
                print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Batch variance: the same pairs alone and in a batch",
        "",
        f"The behaving fixture, {args.pairs} pairs, each type scored alone (parallel 1) and together (parallel "
        f"{args.parallel}), {'float32' if args.f32_kv else 'float16'} KV cache, on "
        f"`{platform.processor() or platform.machine()}` ({os.cpu_count()} threads). |Δ| against the alone run.",
        "",
        "| type | budget | forced | parallel | same chains | max \\|Δscore\\| | p95 \\|Δscore\\| | median \\|Δscore\\| | "
        "max \\|Δ log-odds\\| | p95 \\|Δ log-odds\\| |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['type']} | {r['budget']} | {r['forced']}/{args.pairs} | {r['parallel']} | "
                     f"{'yes' if r['same_chains'] else 'NO'} | {r['max_dscore']:.1e} | {r['p95_dscore']:.1e} | "
                     f"{r['median_dscore']:.1e} | {r['max_dlogit']:.1e} | {r['p95_dlogit']:.1e} |")
    out = args.out.with_name(args.out.stem + "-f32kv.md") if args.f32_kv else args.out
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
