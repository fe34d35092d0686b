"""``gpu.md`` and ``gpu.json`` from the GPU check's step results (see :mod:`benchmarks.gpu.check`).

Every planned step appears, with its status: ``ok``, ``failed``, ``timed out``, ``not run`` (and why), or ``running``
(the command was stopped during it). Tables show only what ran.
"""

from __future__ import annotations

from typing import Any

NOT_STARTED = {"status": "not run", "reason": "the command ended before this step started"}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _status_table(steps: Any, results: dict[str, dict | None], call: str) -> list[str]:
    lines = ["| step | status | seconds | limit s | call | note |", "|---|---|---:|---:|---|---|"]
    for s in steps:
        r = results.get(s.name) or NOT_STARTED
        origin = "" if r.get("call") in (None, call) else f"earlier call {r['call']}"
        lines.append(f"| {s.name} | {r.get('status')} | {_fmt(r.get('seconds'), 0)} | {_fmt(r.get('limit_s'))} | "
                     f"{origin} | {str(r.get('reason') or '').replace('|', '/')[:300]} |")
    return lines


def _machine(r: dict | None) -> list[str]:
    d = (r or {}).get("data") or {}
    if not d:
        return ["Machine facts were not recorded."]
    cuda = d.get("cuda_device") or {}
    gpu = (f"{cuda['name']}, {cuda['memory_gib']:.0f} GiB, compute capability {cuda['capability']}, "
           f"{cuda['multiprocessors']} multiprocessors" if cuda else "no CUDA device")
    return [f"- date: {d.get('date')}; host `{d.get('host')}`; {d.get('nproc')} cores ({d.get('cpu')})",
            f"- GPU: {gpu}; nvidia-smi: `{str(d.get('gpu', ''))[:160]}`",
            f"- CUDA compiler: `{d.get('nvcc')}`; CMake: `{d.get('cmake')}`",
            f"- Python {d.get('python')}; " + ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items())
            + f"; torch's CUDA: {d.get('torch_cuda')}"]


def _build(r: dict | None) -> list[str]:
    d = (r or {}).get("data") or {}
    if not d.get("seconds"):
        return ["The build did not run to the end (see the steps table)."]
    probe = d.get("probe") or {}
    libs = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in (d.get("libs") or {}).items())
    return [f"- `CMAKE_ARGS={' '.join(d.get('cmake_args', []))}`, {d.get('jobs')} jobs: **{d['seconds']:.0f} s** "
            "(pip install of the carried sdist, --no-index --no-build-isolation"
            + ("; the background jobs, at nice 10, ran meanwhile)" if d.get("background_busy") else ")"),
            f"- llama_cpp {probe.get('version', '?')}, GPU offload: {probe.get('gpu_offload')}; libraries: {libs}",
            f"- llama.cpp system info: `{str(probe.get('system_info', ''))[:400]}`"]


COMPARISONS = (("gpu-all", "cpu"), ("gpu-half", "cpu"), ("gpu-all", "hf16"), ("gpu-half", "hf16"), ("cpu", "hf16"))


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if "not_run" in row:
        return f"not run ({row['not_run']})"
    n = row["pairs"]
    mark = "**✗** " if str(row.get("verdict", "")).startswith("failed") else ""
    return f"{mark}{row['decisions_agree']}/{n} · {row['identical_reasoning']}/{n} · {row['max_delta']:.1e}"


def fidelity_totals(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per comparison, over every case and type that ran: pairs, decisions agreeing, identical reasoning, max Δ."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "not_run" in row:
            continue
        t = totals.setdefault(f"{row['run']} vs {row['against']}",
                              {"pairs": 0, "decisions_agree": 0, "identical_reasoning": 0, "max_delta": 0.0})
        for key in ("pairs", "decisions_agree", "identical_reasoning"):
            t[key] += row[key]
        t["max_delta"] = max(t["max_delta"], row["max_delta"])
    return totals


def _fidelity(r: dict | None) -> list[str]:
    d = (r or {}).get("data") or {}
    rows = d.get("comparisons") or []
    if not rows:
        return ["Not run (see the steps table)."]
    lines = ["Official protocol, the budget cases of `tests/test_vllm_judge.py` on the behaving fixtures (and the two "
             "checkpoints derived from them), each exported by our exporter to F16 and Q4_K_M; parallel 4, n_ctx 512, "
             "float32 KV cache (the tests' settings). `cpu`: llama.cpp with no CUDA device visible; `gpu-all`: every "
             "layer offloaded; `gpu-half`: half the layers; `hf16`: the transformers backend in float16 (on the "
             "checkpoint, so against a Q4_K_M GGUF it also measures the quantization). Each cell: decisions agreeing · "
             "identical reasoning (same text, token count, forced and too-long flags) · max |Δscore|.", "",
             "| case | type | " + " | ".join(f"{a} vs {b}" for a, b in COMPARISONS) + " |",
             "|---|---|" + "---|" * len(COMPARISONS)]
    by = {(row["case"], row["type"], row["run"], row["against"]): row for row in rows}
    for case, gguf_type in dict.fromkeys((row["case"], row["type"]) for row in rows):
        cells = [_cell(by.get((case, gguf_type, a, b))) for a, b in COMPARISONS]
        lines.append(f"| {case} | {gguf_type} | " + " | ".join(cells) + " |")
    lines += ["", "All cases together:", "", "| comparison | pairs | decisions agree | identical reasoning | "
              "max abs Δscore |", "|---|---:|---:|---:|---:|"]
    for name, t in fidelity_totals(rows).items():
        lines.append(f"| {name} | {t['pairs']} | {t['decisions_agree']} | {t['identical_reasoning']} | "
                     f"{t['max_delta']:.2e} |")
    bars = dict.fromkeys(row["bar"] for row in rows if row.get("bar"))
    failed = [row for row in rows if str(row.get("verdict", "")).startswith("failed")]
    lines += ["", "Bars (the step fails when a comparison misses its bar; **✗** in the table): "
              + "; ".join(bars) + ". A Q4_K_M GGUF against float16 transformers measures the quantization: "
              "reported, not judged."]
    if failed:
        lines += ["", "Comparisons that missed their bar:", ""]
        lines += [f"- {r['case']} | {r['type']} | {r['run']} vs {r['against']}: {r['verdict'].removeprefix('failed: ')}"
                  for r in failed]
    devices = sorted({(row["run"], row.get("device")) for row in rows if row.get("device")})
    if devices:
        lines += ["", "Devices as the runs reported them: " + "; ".join(f"{k}: {v}" for k, v in devices)]
    return lines


def _speed(results: dict[str, dict | None]) -> list[str]:
    rows, skipped = [], []
    for name in ("speed-small", "speed-large", "transformers-speed"):
        d = ((results.get(name) or {}).get("data")) or {}
        rows += d.get("rows", [])
        skipped += [{"step": name, **s} for s in d.get("skipped", [])]
    if not rows and not skipped:
        return ["Not run (see the steps table)."]
    lines = ["Random-weight models (every pair runs to the budget: the fallback answer is read after each), the "
             "official protocol; pairs: TREC RAG 2024 passages over 4 queries, 2 per slot (at least 2). rank1-local "
             "offloads every layer (n_gpu_layers -1); its steps are timed (`benchmarks/gpu/timing.py`): *step* is one scheduler step in the "
             "steady state (every slot generating), *device* the `llama_decode` call plus waiting for the device, "
             "*host* the rest (batch, logits rows, argmax, protocol). The transformers backend scores one pair at a "
             "time (no parallel setting).", "",
             "| shape | type | engine | device | parallel | pairs | budget | pairs/s | generated tok/s | "
             "prompt tok/s | step ms | device ms | host ms | host share |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        gen = (row.get("steps") or {}).get("generate") or {}
        mark = " *" if row.get("background_busy") else ""
        lines.append(f"| {row['shape']} | {row['type']} | {row['engine']}{mark} | {row['device']} | {row['parallel']} | "
                     f"{row['pairs']} | "
                     f"{row['budget']} | {row['pairs_s']:.2f} | {row['gen_tok_s']:.0f} | {row['prompt_tok_s']:.0f} | "
                     f"{_fmt(gen.get('step_ms'))} | {_fmt(gen.get('device_ms'))} | {_fmt(gen.get('host_ms'))} | "
                     + (f"{gen['host_share']:.0%} |" if "host_share" in gen else " |"))
    for s in skipped:
        lines.append(f"| not run: {s.get('step')} {s.get('shape', '')} {s.get('type', '')} "
                     f"{s.get('parallel', '')}: {s.get('reason')} ||||||||||||||")
    if any(row.get("background_busy") for row in rows):
        lines += ["", "\\* measured while the background job wrote and quantized the random GGUFs (every core, at nice "
                  "10): its host times may be inflated."]
    split = [row for row in rows if (row.get("steps") or {}).get("generate", {}).get("steps")]
    if split:
        lines += ["", "Host time per steady-state step, split: *readout* (batch filled through ctypes, each logits row "
                  "read and copied into numpy) and *scheduler* (argmax, token text, protocol, slots).", "",
                  "| shape | type | parallel | rows/step | readout ms | scheduler ms | host µs per row |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in split:
            gen = row["steps"]["generate"]
            lines.append(f"| {row['shape']} | {row['type']} | {row['parallel']} | {gen['rows_per_step']:.1f} | "
                         f"{gen['readout_ms']:.2f} | {gen['scheduler_ms']:.2f} | {gen['host_us_per_row']:.0f} |")
    return lines


def _overhead(r: dict | None) -> list[str]:
    d = (r or {}).get("data") or {}
    if not d.get("per_row_us"):
        return ["Not run (see the steps table)."]
    lines = [f"Per logits row ({d.get('vocab')} float32), on this machine's CPU: "
             + "; ".join(f"{k}: {v:.0f} µs" for k, v in d["per_row_us"].items())]
    d2h = d.get("device_to_host")
    if isinstance(d2h, dict):
        lines += ["", "Copying P rows of logits from the GPU (torch, median of 50), and what reading only the argmax "
                  "or the top 20 would copy:", "",
                  "| P | MB | to pinned memory ms | to pageable memory ms | argmax on the device ms | top-20 on the "
                  "device ms |", "|---:|---:|---:|---:|---:|---:|"]
        for p, c in d2h.items():
            lines.append(f"| {p} | {c['MB']:.1f} | {c['pinned_ms']:.3f} | {c['pageable_ms']:.3f} | "
                         f"{c['device_argmax_ms']:.3f} | {c['device_topk20_ms']:.3f} |")
    elif d2h:
        lines.append(f"Device-to-host copies: {d2h}")
    return lines


def _batched_bench(r: dict | None) -> list[str]:
    d = (r or {}).get("data") or {}
    runs = d.get("runs") or []
    if not runs:
        return ["Not run (see the steps table)."]
    lines = ["llama.cpp's `llama-batched-bench` (compiled against the same build): PP = prompt tokens per sequence, "
             "TG = generated tokens per sequence, B = sequences decoded together; S_TG t/s is the generation rate "
             "over all sequences."]
    for run in runs:
        lines += ["", f"**{run['shape']} {run['type']}**" + (f": not run ({run['not_run']})" if "not_run" in run
                                                             else f" (exit status {run['status']}, {run['seconds']} s)")]
        if run.get("table"):
            lines += [""] + run["table"]
    return lines


def _summary(steps: Any, results: dict[str, dict | None]) -> list[str]:
    lines = []
    build = ((results.get("build") or {}).get("data")) or {}
    if build.get("seconds") and not build.get("failed"):
        lines.append(f"- build: {build['seconds']:.0f} s with {build.get('jobs')} jobs")
    rows = (((results.get("fidelity") or {}).get("data")) or {}).get("comparisons") or []
    for name, t in fidelity_totals(rows).items():
        lines.append(f"- fidelity, {name}: decisions {t['decisions_agree']}/{t['pairs']}, identical reasoning "
                     f"{t['identical_reasoning']}/{t['pairs']}, max |Δscore| {t['max_delta']:.1e}")
    judged = [row for row in rows if row.get("bar")]
    if judged:
        failed = sum(str(row.get("verdict")).startswith("failed") for row in judged)
        lines.append(f"- fidelity verdict: {len(judged) - failed} of {len(judged)} judged comparisons met their bar"
                     + (f", **{failed} did not**" if failed else ""))
    speed = []
    for name in ("speed-small", "speed-large", "transformers-speed"):
        speed += (((results.get(name) or {}).get("data")) or {}).get("rows", [])
    best: dict[tuple[str, str, str], dict] = {}
    for row in speed:
        key = (row["shape"], row["type"], row["engine"])
        if key not in best or row["parallel"] > best[key]["parallel"]:
            best[key] = row
    for (shape, gguf_type, engine), row in best.items():
        gen = (row.get("steps") or {}).get("generate") or {}
        host = f", host {gen['host_share']:.0%} of a step" if "host_share" in gen else ""
        lines.append(f"- speed, {shape} {gguf_type} {engine} at parallel {row['parallel']}: {row['pairs_s']:.2f} "
                     f"pairs/s, {row['gen_tok_s']:.0f} generated tok/s{host}")
    missing = [s.name for s in steps if (results.get(s.name) or NOT_STARTED).get("status") != "ok"]
    if missing:
        lines.append(f"- did not pass or did not run: {', '.join(missing)} (see Steps)")
    return lines or ["Nothing ran yet."]


def render(steps: Any, results: dict[str, dict | None], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(Markdown, JSON object) for the steps' results."""
    data = {"meta": meta, "steps": {s.name: results.get(s.name) or NOT_STARTED for s in steps}}
    machine = ((results.get("machine") or {}).get("data")) or {}
    gpu = meta["mode"] == "gpu"
    lines = ["# GPU check: rank1-local with CUDA offload", ""]
    if not gpu:
        lines += ["**CPU REHEARSAL: llama.cpp built with GGML_CUDA off, tiny shapes, everything on the CPU. This is "
                  "not a GPU result: the 'gpu' rows ran on the CPU.**", ""]
    lines += [f"Call {meta['call']} on `{meta['host']}`, {machine.get('date', 'date not recorded')}; "
              f"{(machine.get('cuda_device') or {}).get('name') or 'no CUDA device'}. Time budget {meta['budget_s']} s, "
              f"{meta['elapsed_s']:.0f} s used so far. Made by `benchmarks/gpu_check.sh`"
              + ("." if gpu else " --cpu-rehearsal."), "",
              "## Summary", "", *_summary(steps, results), "",
              "## Steps", "", *_status_table(steps, results, meta["call"]), "",
              "## Machine", "", *_machine(results.get("machine")), "",
              "## Build", "", *_build(results.get("build")), "",
              "## Fidelity", "", *_fidelity(results.get("fidelity")), "",
              "## Speed", "", *_speed(results), "",
              "## Host work per decode step", "", *_overhead(results.get("overhead")), "",
              "## llama-batched-bench", "", *_batched_bench(results.get("batched-bench"))]
    return "\n".join(lines) + "\n", data
