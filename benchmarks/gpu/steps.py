"""The GPU check's steps, each run in its own process by :mod:`benchmarks.gpu.check`:
``python -m benchmarks.gpu.steps STEP --ctx WORK/ctx.json --deadline EPOCH``.

A step writes what it measured to ``WORK/data/STEP.json`` as it goes (so a step stopped by its time guard leaves
the rows it finished), and sets ``failed`` there when it ran but did not do its job. Within a step, a run that does
not fit before the deadline is recorded as not run, with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("gpu-check")


@dataclass
class Ctx:
    mode: str
    root: Path
    work: Path
    carry: Path
    out: Path
    call: str
    settings: dict[str, Any]
    nproc: int
    deadline: float

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def site(self) -> Path:
        return self.work / "llama-site"

    @property
    def random_dir(self) -> Path:
        return self.work / "random"


class Data(dict):
    """A step's measurements, rewritten to ``WORK/data/<name>.json`` on every :meth:`save`."""

    def __init__(self, ctx: Ctx, name: str) -> None:
        super().__init__()
        self.path = ctx.work / "data" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        part = self.path.with_suffix(".part")
        part.write_text(json.dumps(self, indent=2, default=str))
        part.replace(self.path)


def sh(cmd: list[str], timeout: float = 30, **kwargs: Any) -> tuple[int, str]:
    """(exit status, output) of a short command; 127 and a message when it is not there."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        return done.returncode, (done.stdout + done.stderr).strip()
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{cmd[0]}: no answer within {timeout:.0f} s"


# --- machine ---------------------------------------------------------------------------------------------------------
def step_machine(ctx: Ctx, data: Data) -> None:
    data.update(date=time.strftime("%Y-%m-%d %H:%M:%S %z"), host=platform.node(), nproc=ctx.nproc,
                python=sys.version.split()[0], platform=platform.platform(), cpu=_cpu_model())
    queries = {
        "gpu": ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
        "nvcc": ["nvcc", "--version"], "cmake": ["cmake", "--version"], "memory": ["free", "-g"],
        "disk": ["df", "-h", str(ctx.work)],
    }
    for key, cmd in queries.items():
        status, text = sh(cmd)
        lines = text.splitlines()
        data[key] = (lines[-1] if key == "nvcc" else lines[0] if key == "cmake" else text) if status == 0 else text
    from importlib import metadata

    versions = {}
    for dist in ("numpy", "torch", "transformers", "tokenizers", "safetensors", "gguf", "huggingface-hub",
                 "scikit-build-core"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    data["versions"] = versions
    try:
        import torch

        data["torch_cuda"] = torch.version.cuda
        data["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            data["cuda_device"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                   "multiprocessors": props.multi_processor_count,
                                   "capability": f"{props.major}.{props.minor}"}
    except Exception as exc:  # noqa: BLE001
        data["cuda_available"] = f"torch failed: {exc}"
    data.save()
    if ctx.gpu and data.get("cuda_available") is not True:
        data["failed"] = "torch sees no CUDA device"
    elif ctx.gpu and data["nvcc"].endswith("not found"):
        data["failed"] = "no nvcc on PATH (nor in /usr/local/cuda/bin)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- build -----------------------------------------------------------------------------------------------------------
def cmake_args(ctx: Ctx) -> list[str]:
    """What we add to llama-cpp-python's CMake call: CUDA for Hopper (sm_90) or no CUDA; no multimodal library and
    no OpenSSL (neither is used by rank1-local)."""
    device = (["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NCCL=OFF"] if ctx.gpu
              else ["-DGGML_CUDA=off"])
    return [*device, "-DLLAVA_BUILD=OFF", "-DLLAMA_OPENSSL=OFF"]


def step_build(ctx: Ctx, data: Data) -> None:
    from benchmarks.gpu.prepare import SDIST_DIR

    carried = ctx.carry / SDIST_DIR
    if not (carried / "pyproject.toml").is_file():
        data["failed"] = (f"no carried sources in {carried}: run `python -m benchmarks.gpu.prepare` on a machine "
                          "with a package index and carry .gpu-carry")
        return
    src, build_dir = ctx.work / "llama-src", ctx.work / "llama-build"
    # The build writes into its source tree (llama_cpp/lib), so it gets a copy. A copy of the same sdist from an earlier
    # call on this machine is kept, with its files' times, so that CMake and ninja go on from where a build stopped
    # by its time guard got to.
    sdist_sha = _read_json(ctx.carry / "MANIFEST.json").get("sdist_sha256", "unknown")
    marker = src / ".rank1-sdist-sha256"
    if not marker.is_file() or marker.read_text() != sdist_sha:
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(carried, src)
        marker.write_text(sdist_sha)
    else:
        data["sources"] = "kept from an earlier call (a build that was stopped goes on)"
    shutil.rmtree(ctx.site, ignore_errors=True)
    stamp = build_dir / "rank1-mode"
    if build_dir.exists() and (not stamp.is_file() or stamp.read_text() != " ".join(cmake_args(ctx))):
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(" ".join(cmake_args(ctx)))
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args(ctx)), CMAKE_BUILD_PARALLEL_LEVEL=str(ctx.nproc))
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(ctx.site), "-v",
           f"--config-settings=build-dir={build_dir}", str(src)]
    data.update(cmake_args=cmake_args(ctx), jobs=ctx.nproc, command=" ".join(cmd), background_busy=background_busy(ctx))
    data.save()
    log_path = ctx.work / "logs" / "build-output.log"
    print(f"building llama-cpp-python: CMAKE_ARGS={env['CMAKE_ARGS']!r}, {ctx.nproc} jobs; log: {log_path}",
          flush=True)
    start = time.perf_counter()
    status = _run_logged(cmd, env, log_path, progress=lambda line: line.startswith("[") and "/" in line[:12])
    data["seconds"] = round(time.perf_counter() - start, 1)
    _copy_tail(log_path, ctx.out / "build.log", 1 << 20)
    print(f"build: exit status {status} after {data['seconds']} s", flush=True)
    if status != 0:
        data["failed"] = f"pip install exited with status {status} after {data['seconds']} s (see build.log)"
        data.save()
        return
    probe = ("import json, llama_cpp as lc; lc.llama_backend_init(); print(json.dumps({'file': lc.__file__, "
             "'version': lc.__version__, 'gpu_offload': bool(lc.llama_supports_gpu_offload()), "
             "'system_info': lc.llama_print_system_info().decode()}))")
    status, text = sh([sys.executable, "-c", probe], timeout=60)
    lib = ctx.site / "llama_cpp" / "lib"
    data["libs"] = {p.name: p.stat().st_size for p in sorted(lib.glob("*.so"))} if lib.is_dir() else {}
    if status != 0:
        data["failed"] = f"the built llama_cpp does not import: {text[-400:]}"
    else:
        data["probe"] = json.loads(text.splitlines()[-1])
        if not data["probe"]["file"].startswith(str(ctx.site)):
            data["failed"] = f"python imports llama_cpp from {data['probe']['file']}, not from the build"
        elif ctx.gpu and not data["probe"]["gpu_offload"]:
            data["failed"] = "the build has no GPU offload (llama_supports_gpu_offload() is false)"
    data.save()


def _run_logged(cmd: list[str], env: dict[str, str], log_path: Path, progress: Callable[[str], bool]) -> int:
    """Run ``cmd`` with its output in ``log_path``, echoing a progress line at most every 20 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = 0.0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if progress(line.strip()) and time.time() - shown > 20:
                print("  " + line.strip()[:160], flush=True)
                shown = time.time()
        return proc.wait()


def _copy_tail(src: Path, dest: Path, n_bytes: int) -> None:
    try:
        data = src.read_bytes()
    except OSError:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data[-n_bytes:])


# --- random GGUFs (background) ---------------------------------------------------------------------------------------
def speed_shapes(ctx: Ctx) -> list[str]:
    return list(dict.fromkeys(ctx.settings["shapes"].values()))


def wait_for_step(ctx: Ctx, name: str, reserve: float = 0.0) -> str | None:
    """Wait until step ``name`` (of this call, or kept from an earlier one) has ended; None when it passed, else why
    not (it failed, or did not end before the deadline less ``reserve``). A step's process marks its data ``ended``
    when it returns, before the driver records its result (which, for a background step, waits for the driver's
    next turn)."""
    while True:
        status = _read_json(ctx.work / "results" / f"{name}.json").get("status")
        if status == "ok":
            return None
        if status not in (None, "running"):
            return f"{name} did not pass ({status})"
        data = _read_json(ctx.work / "data" / f"{name}.json")
        if data.get("ended"):
            return f"{name} failed: {data['failed']}" if data.get("failed") else None
        if ctx.left() < reserve:
            return f"{name} did not end in time"
        time.sleep(1)


def step_random_ggufs(ctx: Ctx, data: Data) -> None:
    """The speed runs' random GGUFs: every F16 file at once (no llama.cpp needed), then, once the build has passed,
    the Q4_K_M files (llama.cpp's quantizer, from the F16 ones)."""
    from benchmarks.gpu.random_gguf import checkpoint_folder, random_gguf

    data["files"] = []
    for shape in speed_shapes(ctx):  # config and tokenizer first: the transformers runs need no more
        checkpoint_folder(shape, ctx.random_dir)

    def write(shape: str, gguf_type: str) -> None:
        path, seconds = random_gguf(shape, gguf_type, ctx.random_dir, threads=ctx.nproc)
        data["files"].append({"shape": shape, "type": gguf_type, "path": str(path), "bytes": path.stat().st_size,
                              "seconds": round(seconds, 1)})
        data.save()
        print(f"random GGUF {path.name}: {path.stat().st_size / 1e9:.2f} GB in {seconds:.0f} s", flush=True)

    for shape in speed_shapes(ctx):
        write(shape, "F16")
    why = wait_for_step(ctx, "build")
    if why:
        data["failed"] = f"no Q4_K_M files: {why}"
        return
    for shape in speed_shapes(ctx):
        write(shape, "Q4_K_M")


# --- fixtures --------------------------------------------------------------------------------------------------------
def fixture_ggufs(ctx: Ctx) -> Path:
    return ctx.work / "fixture-ggufs"


def step_checkpoints(ctx: Ctx, data: Data) -> None:
    """The fixture checkpoints the fidelity cases run on (torch on the CPU, 4 threads: the build runs meanwhile): the
    behaving fixtures, rebuilt from their shipped weights and checked, and the checkpoints derived from them."""
    import torch

    torch.set_num_threads(min(4, ctx.nproc))
    sys.path.insert(0, str(ctx.root / "tests"))
    from derived_models import answers_muted, derive, ends_early, overconfident

    from quantize.fixtures import build_fixture

    timings: dict[str, float] = {}
    checkpoints: dict[str, Path] = {}
    for name in ("behaving", "behaving-think"):
        t0 = time.perf_counter()
        checkpoints[name] = build_fixture(name)
        timings[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    derived = ctx.work / "derived"
    checkpoints["overconfident"] = derive(checkpoints["behaving"], derived / "overconfident", overconfident)
    checkpoints["answers-muted"] = derive(checkpoints["behaving"], derived / "answers-muted", answers_muted)
    checkpoints["ends-early"] = derive(checkpoints["behaving"], derived / "ends-early", ends_early)
    timings["derived"] = time.perf_counter() - t0
    data.update(checkpoints={k: str(v) for k, v in checkpoints.items()},
                seconds={k: round(v, 1) for k, v in timings.items()})
    print(f"checkpoints: {', '.join(checkpoints)}", flush=True)


def step_fixtures(ctx: Ctx, data: Data) -> None:
    """F16 and Q4_K_M exports, with our exporter, of the checkpoints the background job built."""
    from quantize.gguf_export import export_gguf

    t0 = time.perf_counter()
    why = wait_for_step(ctx, "checkpoints", reserve=20)
    data["waited_s"] = round(time.perf_counter() - t0, 1)
    if why:
        data["failed"] = f"no fixture checkpoints: {why}"
        return
    checkpoints = _read_json(ctx.work / "data" / "checkpoints.json")["checkpoints"]
    data.update(checkpoints=checkpoints, ggufs={})
    data.save()
    for name, folder in checkpoints.items():
        target = fixture_ggufs(ctx) / name
        for gguf_type in ctx.settings["fidelity_types"]:
            existing = target / f"{Path(folder).name}-{gguf_type}.gguf"
            t0 = time.perf_counter()
            if not existing.is_file():
                (result,) = export_gguf(folder, target, gguf_type, threads=ctx.nproc, progress=False,
                                        allow_no_imatrix=True)
                existing = result.path
            data["ggufs"].setdefault(name, {})[gguf_type] = {
                "path": str(existing), "bytes": existing.stat().st_size, "seconds": round(time.perf_counter() - t0, 2)}
            data.save()
    print(f"fixtures: {sum(len(v) for v in data['ggufs'].values())} GGUFs exported", flush=True)


# --- fidelity --------------------------------------------------------------------------------------------------------
RESULT_FIELDS = ("score", "reasoning", "n_tokens", "forced", "too_long")


def _result_row(r: Any) -> dict[str, Any]:
    return {k: getattr(r, k) for k in RESULT_FIELDS}


def _fidelity_cases(ctx: Ctx) -> dict[str, tuple[str, int, list[tuple[str, str]]]]:
    from benchmarks.gpu.cases import cases

    wanted = ctx.settings["fidelity_cases"]
    return {name: case for name, case in cases().items() if not wanted or name in wanted}


def step_fidelity_llama(ctx: Ctx, data: Data, which: str) -> None:
    """Every case on every GGUF type with llama.cpp: ``cpu`` (run with no CUDA device visible), or ``gpu`` (all
    layers offloaded, then half of them)."""
    from benchmarks.gpu.cases import N_CTX, PARALLEL
    from rank1_local import Rank1, ScoringConfig

    fixtures = json.loads((ctx.work / "data" / "fixtures.json").read_text())
    threads = ctx.nproc if which == "gpu" or not ctx.gpu or ctx.nproc < 8 else ctx.nproc - 4
    data["runs"] = {}
    for case, (checkpoint, budget, pairs) in _fidelity_cases(ctx).items():
        for gguf_type in ctx.settings["fidelity_types"]:
            gguf = fixtures["ggufs"][checkpoint][gguf_type]["path"]
            configs = {"cpu": 0} if which == "cpu" else {"gpu-all": -1, "gpu-half": None}
            for label, layers in configs.items():
                config = ScoringConfig(max_think_tokens=budget, n_ctx=N_CTX)
                if layers is None:
                    layers = _n_layers(fixtures["checkpoints"][checkpoint]) // 2
                t0 = time.perf_counter()
                with Rank1(gguf, config, parallel=PARALLEL, threads=threads, f32_kv_cache=True,
                           n_gpu_layers=layers) as model:
                    device = model.device
                    results = model.score_pairs(pairs)
                data["runs"][f"{case}|{gguf_type}|{label}"] = {
                    "device": device, "n_gpu_layers": layers, "seconds": round(time.perf_counter() - t0, 2),
                    "results": [_result_row(r) for r in results]}
                data.save()
    print(f"fidelity-{which}: {len(data['runs'])} runs", flush=True)


def _n_layers(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "config.json").read_text())["num_hidden_layers"])


def step_fidelity_hf(ctx: Ctx, data: Data) -> None:
    """Every case with the transformers backend in float16 (CUDA; the rehearsal: the CPU)."""
    from benchmarks.gpu.cases import N_CTX
    from rank1_local import ScoringConfig
    from rank1_local.backends.hf import TransformersRank1

    fixtures = json.loads((ctx.work / "data" / "fixtures.json").read_text())
    device = "cuda" if ctx.gpu else "cpu"
    data["runs"] = {}
    models: dict[str, Any] = {}
    try:
        for case, (checkpoint, budget, pairs) in _fidelity_cases(ctx).items():
            if checkpoint not in models:
                models[checkpoint] = TransformersRank1(fixtures["checkpoints"][checkpoint], device=device,
                                                       dtype="float16", max_think_tokens=64, n_ctx=N_CTX)
            t0 = time.perf_counter()
            results = models[checkpoint].score_pairs(pairs, config=ScoringConfig(max_think_tokens=budget, n_ctx=N_CTX))
            data["runs"][f"{case}|hf16"] = {"device": models[checkpoint].device,
                                            "seconds": round(time.perf_counter() - t0, 2),
                                            "results": [_result_row(r) for r in results]}
            data.save()
    finally:
        for model in models.values():
            model.close()
    print(f"fidelity-hf: {len(data['runs'])} runs", flush=True)


def _log_odds(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def compare(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Per-pair agreement of two runs over the same pairs."""
    same_path = [x["reasoning"] == y["reasoning"] and x["n_tokens"] == y["n_tokens"] and x["forced"] == y["forced"]
                 and x["too_long"] == y["too_long"] for x, y in zip(a, b, strict=True)]
    deltas = [abs(x["score"] - y["score"]) for x, y in zip(a, b, strict=True)]
    agree = [(x["score"] > 0.5) == (y["score"] > 0.5) for x, y in zip(a, b, strict=True)]
    log_odds = [abs(_log_odds(x["score"]) - _log_odds(y["score"])) for x, y in zip(a, b, strict=True)]
    return {"pairs": len(a), "decisions_agree": sum(agree),
            "decisions_differ_same_path": sum(not g for g, s in zip(agree, same_path) if s),
            "identical_reasoning": sum(same_path), "max_delta": max(deltas, default=0.0),
            "max_delta_same_path": max((d for d, s in zip(deltas, same_path) if s), default=0.0),
            "max_log_odds_same_path": max((d for d, s in zip(log_odds, same_path) if s), default=0.0),
            "forced": sum(x["forced"] for x in a), "too_long": sum(x["too_long"] for x in a)}


COMPARISONS = (("gpu-all", "cpu"), ("gpu-half", "cpu"), ("gpu-all", "hf16"), ("gpu-half", "hf16"), ("cpu", "hf16"))


@dataclass(frozen=True)
class Bar:
    """What a fidelity comparison must meet, per case, or the step fails.

    - ``chain_changes``: the share of a case's pairs whose reasoning (text, token count, forced and too-long flags)
      may differ. Where a chain may differ, its decision is not compared (another chain may end elsewhere);
      everywhere else the decisions must agree.
    - ``max_log_odds``: the largest |Δ log-odds| of the score allowed on a pair with identical reasoning.
    """

    label: str
    chain_changes: float
    max_log_odds: float


# llama.cpp on the device against llama.cpp on the CPU, on the same GGUF with a float32 KV cache: the same arithmetic
# in another order (and, for F16 weights, the same float16 rounding of activations). Greedy chains and decisions must
# be identical; the scores may move by accumulation order: at most 0.1 in log-odds, the vLLM tier's bound on an
# engine's own float16 rounding (tests/test_vllm_judge.py). Q4_K_M: the CUDA kernels quantize activations to q8_1,
# the CPU ones to q8_K (8 bits per value against float16's 11): 0.5.
SAME_FILE = {"F16": Bar("the same GGUF on the device and on the CPU: identical chains and decisions, |Δlog-odds| "
                        "≤ 0.1", 0.0, 0.1),
             "Q4_K_M": Bar("the same GGUF on the device and on the CPU: identical chains and decisions, "
                           "|Δlog-odds| ≤ 0.5", 0.0, 0.5)}
# llama.cpp on the F16 GGUF (float32 arithmetic) against transformers in float16 on the checkpoint: transformers'
# own float16 rounding, which the vLLM tier bounds by 0.1 in log-odds and lets change a greedy near-tie on at most a
# quarter of a case's pairs (tests/test_vllm_judge.py).
AGAINST_HF16 = Bar("F16 GGUF against transformers float16: chains identical on at least 3/4 of the pairs, decisions "
                   "equal where they are, |Δlog-odds| ≤ 0.1", 0.25, 0.1)


def bar_for(run: str, against: str, gguf_type: str) -> Bar | None:
    """The bar of one comparison; None for a quantized GGUF against float16 transformers, which measures the
    quantization (reported, not judged)."""
    if against == "cpu":
        return SAME_FILE.get(gguf_type)
    return AGAINST_HF16 if gguf_type == "F16" else None


def verdict(row: dict[str, Any], bar: Bar) -> str | None:
    """What is wrong with one comparison row (from :func:`compare`) under ``bar``; None when it passes."""
    pairs = row["pairs"]
    problems = []
    changed, allowed = pairs - row["identical_reasoning"], int(pairs * bar.chain_changes)
    if changed > allowed:
        problems.append(f"reasoning differs on {changed} of {pairs} pairs (at most {allowed})")
    differ = row["decisions_differ_same_path"] if bar.chain_changes else pairs - row["decisions_agree"]
    if differ:
        problems.append(f"decisions differ on {differ} of {pairs} pairs")
    if row["max_log_odds_same_path"] > bar.max_log_odds:
        problems.append(f"|Δlog-odds| {row['max_log_odds_same_path']:.3f} > {bar.max_log_odds}")
    return "; ".join(problems) or None


def judge_fidelity(runs: dict[str, Any], cases: dict[str, tuple[str, int, list]],
                   types: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every comparison row of the fidelity step, each with its bar and verdict; and the failures (a comparison
    that missed its bar, or could not be made)."""
    rows, failures = [], []
    for case, (checkpoint, budget, _pairs) in cases.items():
        for gguf_type in types:
            for left, right in COMPARISONS:
                key = lambda label: f"{case}|hf16" if label == "hf16" else f"{case}|{gguf_type}|{label}"  # noqa: E731
                a, b = runs.get(key(left)), runs.get(key(right))
                row = {"case": case, "checkpoint": checkpoint, "budget": budget, "type": gguf_type, "run": left,
                       "against": right}
                bar = bar_for(left, right, gguf_type)
                if a is None or b is None:
                    row["not_run"] = f"{left if a is None else right} did not run"
                else:
                    row.update(compare(a["results"], b["results"]), device=a["device"], against_device=b["device"])
                if bar is None:
                    row["verdict"] = "not judged: a quantized GGUF against float16 transformers measures the quantization"
                else:
                    row["bar"] = bar.label
                    why = row.get("not_run") or verdict(row, bar)
                    row["verdict"] = "ok" if why is None else f"failed: {why}"
                    if why is not None:
                        failures.append(f"{case} | {gguf_type} | {left} vs {right}: {why}")
                rows.append(row)
    return rows, failures


def step_fidelity(ctx: Ctx, data: Data) -> None:
    """The CPU reference (no CUDA device visible, so llama.cpp offloads nothing, not even big prompt batches), the
    GPU runs and the transformers runs: at once on the GPU machine (they use different resources), in turn in the
    rehearsal. The step fails when a comparison misses its bar (:func:`bar_for`)."""
    jobs = {"fidelity-cpu": (["fidelity-llama", "--which", "cpu"], {"CUDA_VISIBLE_DEVICES": ""} if ctx.gpu else {}),
            "fidelity-gpu": (["fidelity-llama", "--which", "gpu"], {}),
            "fidelity-hf": (["fidelity-hf"], {})}
    status = _run_children(ctx, jobs, parallel=ctx.gpu and ctx.nproc >= 8)
    data["children"] = status
    runs: dict[str, Any] = {}
    for name in jobs:
        runs.update(_read_json(ctx.work / "data" / f"{name}.json").get("runs", {}))
    data["comparisons"], failures = judge_fidelity(runs, _fidelity_cases(ctx), ctx.settings["fidelity_types"])
    data["disagreements"] = failures
    missing = [f"{name}: {s}" for name, s in status.items() if s != "ok"]
    if missing or failures:
        data["failed"] = "; ".join(missing + ([f"{len(failures)} comparison(s) missed their bar: {failures[0]}"
                                               + (" …" if len(failures) > 1 else "")] if failures else []))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _run_children(ctx: Ctx, jobs: dict[str, tuple[list[str], dict[str, str]]], parallel: bool) -> dict[str, str]:
    """Run sub-steps (``python -m benchmarks.gpu.steps …``) until the deadline; name -> "ok" or what went wrong."""
    procs: dict[str, subprocess.Popen] = {}
    status: dict[str, str] = {}

    def start(name: str) -> None:
        args, env = jobs[name]
        (ctx.work / "data" / f"{name}.json").unlink(missing_ok=True)  # never read an earlier call's rows
        cmd = [sys.executable, "-m", "benchmarks.gpu.steps", *args, "--name", name, "--ctx", str(ctx_path(ctx)),
               "--deadline", f"{ctx.deadline:.1f}"]
        procs[name] = subprocess.Popen(cmd, env=dict(os.environ, **env))

    def finish(name: str, timeout: float) -> None:
        try:
            code = procs[name].wait(timeout=max(1.0, timeout))
            status[name] = "ok" if code == 0 else f"exit status {code}"
        except subprocess.TimeoutExpired:
            procs[name].kill()
            procs[name].wait()
            status[name] = "stopped by the step's time guard"

    if parallel:
        for name in jobs:
            start(name)
        for name in jobs:
            finish(name, ctx.left() - 2)
    else:
        for name in jobs:
            if ctx.left() < 5:
                status[name] = "not run: the step's time guard"
                continue
            start(name)
            finish(name, ctx.left() - 2)
    return status


def ctx_path(ctx: Ctx) -> Path:
    return ctx.work / "ctx.json"


# --- speed -----------------------------------------------------------------------------------------------------------
def wait_for_file(ctx: Ctx, path: Path, reserve: float) -> str | None:
    """Wait for the background job to write ``path``; None when it is there, else why not."""
    waited = time.time()
    while not path.is_file():
        status = _read_json(ctx.work / "results" / "random-ggufs.json").get("status")
        progress = _read_json(ctx.work / "data" / "random-ggufs.json")
        if (status not in (None, "running") or progress.get("ended")) and not path.is_file():
            return (f"the background job ended without writing {path.name}"
                    + (f": {progress['failed']}" if progress.get("failed") else f" ({status})"))
        if ctx.left() < reserve:
            return f"{path.name} was not written in time (waited {time.time() - waited:.0f} s)"
        time.sleep(1)
    if time.time() - waited > 1:
        print(f"waited {time.time() - waited:.0f} s for {path.name}", flush=True)
    return None


def background_busy(ctx: Ctx) -> bool:
    """Whether a background job (random GGUFs written and quantized on every core, or fixture checkpoints, at nice
    10) is running: a run measured meanwhile shares the CPU with it, and the report marks it."""
    for name in ("random-ggufs", "checkpoints"):
        status = _read_json(ctx.work / "results" / f"{name}.json").get("status")
        if status == "running" and not _read_json(ctx.work / "data" / f"{name}.json").get("ended"):
            return True
    return False


def speed_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` distinct pairs: 4 TREC RAG 2024 queries, each with up to 32 passages (benchmarks/speed.py's pairs repeat
    after 32, and the pipeline judges a repeated prompt once)."""
    from quantize.calibration import load_calibration

    cal = load_calibration()
    pairs = [(cal[i % 4].query, cal[(i // 4) % len(cal)].text) for i in range(n)]
    if len(set(pairs)) != n:
        raise ValueError(f"only {len(set(pairs))} distinct pairs for {n}")
    return pairs


def step_speed(ctx: Ctx, data: Data, step: str) -> None:
    shape = ctx.settings["shapes"][step]
    data.update(shape=shape, budget=ctx.settings["budget_tokens"], rows=[], skipped=[])
    data.save()
    for gguf_type in ctx.settings["types"]:
        path = ctx.random_dir / f"random-{shape}-{gguf_type}.gguf"
        why = wait_for_file(ctx, path, reserve=20)
        if why:
            data["skipped"].append({"type": gguf_type, "reason": why})
            data.save()
            continue
        name = f"{step}-{gguf_type}"
        status = _run_children(ctx, {name: (["speed-run", "--model", str(path), "--shape", shape,
                                             "--type", gguf_type], {})}, parallel=False)
        run = _read_json(ctx.work / "data" / f"{name}.json")
        data["rows"] += run.get("rows", [])
        data["skipped"] += run.get("skipped", [])
        if status[name] != "ok":
            data["skipped"].append({"type": gguf_type, "reason": f"the run process: {status[name]}"})
        data.save()
    if not data["rows"]:
        data["failed"] = "no speed run finished: " + "; ".join(s["reason"] for s in data["skipped"])


def step_speed_run(ctx: Ctx, data: Data, model: str, shape: str, gguf_type: str) -> None:
    """rank1-local at each parallel setting on one GGUF, every scheduler step timed (:mod:`benchmarks.gpu.timing`)."""
    from benchmarks.gpu.timing import instrument, reset
    from rank1_local import Rank1, ScoringConfig

    budget, n_ctx = ctx.settings["budget_tokens"], ctx.settings["n_ctx"]
    data.update(rows=[], skipped=[])
    layers = -1 if ctx.gpu else 0
    with instrument() as times:
        for parallel in ctx.settings["parallel"]:
            if ctx.left() < 10:
                data["skipped"].append({"type": gguf_type, "parallel": parallel,
                                        "reason": f"not run: the step's time guard ({ctx.left():.0f} s left)"})
                data.save()
                continue
            pairs = speed_pairs(max(2, 2 * parallel))
            busy = background_busy(ctx)
            t0 = time.perf_counter()
            with Rank1(model, ScoringConfig(max_think_tokens=budget, n_ctx=n_ctx), parallel=parallel,
                       n_gpu_layers=layers, threads=ctx.nproc) as m:
                load_s = time.perf_counter() - t0
                m.score_pairs(pairs[:parallel], config=ScoringConfig(max_think_tokens=4, n_ctx=n_ctx))  # warm-up
                reset(times)
                start = time.perf_counter()
                results = m.score_pairs(pairs)
                seconds = time.perf_counter() - start
                stats, device = m.last_stats, m.device
            row = {"shape": shape, "type": gguf_type, "engine": "rank1-local (llama.cpp)", "device": device,
                   "parallel": parallel, "pairs": len(pairs), "budget": budget, "seconds": round(seconds, 3),
                   "load_s": round(load_s, 2), "generated": stats.generated_tokens, "prompt": stats.prompt_tokens,
                   "pairs_s": len(pairs) / seconds, "gen_tok_s": stats.generated_tokens / seconds,
                   "prompt_tok_s": stats.prompt_tokens / seconds,
                   "all_budget": all(r.n_tokens == budget for r in results), "steps": times.summary(),
                   "background_busy": busy or background_busy(ctx)}
            data["rows"].append(row)
            data.save()
            gen = row["steps"]["generate"]
            print(f"{shape} {gguf_type} parallel {parallel}: {row['pairs_s']:.2f} pairs/s, "
                  f"{row['gen_tok_s']:.0f} generated tok/s; steady step {gen.get('step_ms', 0):.2f} ms, "
                  f"host {gen.get('host_ms', 0):.2f} ms ({gen.get('host_share', 0):.0%})", flush=True)


# --- host work per step ----------------------------------------------------------------------------------------------
def _time(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def step_overhead(ctx: Ctx, data: Data) -> None:
    """The host work one logits row costs at Qwen2.5's vocabulary, and what copying P rows from the device costs."""
    import numpy as np

    from rank1_local.core.protocol import top_logprobs

    vocab = 152064
    row = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    data["vocab"] = vocab
    data["per_row_us"] = {
        "copy (np.ndarray.copy of one row)": _time(lambda: row.copy(), 2000) * 1e6,
        "argmax": _time(lambda: int(np.argmax(row)), 2000) * 1e6,
        "top-20 log-probabilities (at the answer only)": _time(lambda: top_logprobs(row), 200) * 1e6,
    }
    data.save()
    if not ctx.gpu:
        data["device_to_host"] = "not run: no GPU in the rehearsal"
        return
    import torch

    copies = {}
    for parallel in ctx.settings["parallel"]:
        src = torch.randn(parallel, vocab, device="cuda")
        pinned = torch.empty(parallel, vocab, pin_memory=True)
        pageable = torch.empty(parallel, vocab)

        def copy(dest: Any) -> None:
            dest.copy_(src)
            torch.cuda.synchronize()

        copies[str(parallel)] = {"MB": parallel * vocab * 4 / 1e6, "pinned_ms": _time(lambda: copy(pinned), 50) * 1e3,
                                 "pageable_ms": _time(lambda: copy(pageable), 50) * 1e3,
                                 "device_argmax_ms": _time(lambda: (src.argmax(dim=1).cpu()), 50) * 1e3,
                                 "device_topk20_ms": _time(lambda: [t.cpu() for t in src.topk(20, dim=1)], 50) * 1e3}
        data["device_to_host"] = copies
        data.save()


# --- transformers ----------------------------------------------------------------------------------------------------
def step_transformers_speed(ctx: Ctx, data: Data) -> None:
    data.update(rows=[], skipped=[])
    for shape in speed_shapes(ctx):
        folder = ctx.random_dir / f"random-{shape}" / "config.json"
        why = wait_for_file(ctx, folder, reserve=20)
        if why:
            data["skipped"].append({"shape": shape, "reason": why})
            continue
        name = f"transformers-speed-{shape}"
        status = _run_children(ctx, {name: (["hf-speed-run", "--shape", shape], {})}, parallel=False)
        run = _read_json(ctx.work / "data" / f"{name}.json")
        data["rows"] += run.get("rows", [])
        if status[name] != "ok":
            data["skipped"].append({"shape": shape, "reason": f"the run process: {status[name]}"})
        data.save()
    if not data["rows"]:
        data["failed"] = "no transformers run finished: " + "; ".join(s["reason"] for s in data["skipped"])


def step_hf_speed_run(ctx: Ctx, data: Data, shape: str) -> None:
    """The transformers backend (float16) on a random model of ``shape``, drawn on the device by transformers' own
    initialisation instead of read from disk (a 7B checkpoint would be 15 GB to write and read), on the speed runs'
    first pairs. The backend scores one pair at a time, so it has no parallel setting."""
    import torch
    import transformers

    from rank1_local import ScoringConfig
    from rank1_local.backends.hf import TransformersRank1

    device = "cuda" if ctx.gpu else "cpu"
    folder = ctx.random_dir / f"random-{shape}"
    auto = transformers.AutoModelForCausalLM
    own = auto.__dict__.get("from_pretrained")  # the class's own (descriptor), or None when it inherits it

    def random_model(path: Any, *args: Any, dtype: Any = None, **kwargs: Any) -> Any:
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device(device):
            return auto.from_config(config, dtype=dtype)

    budget, n_ctx = ctx.settings["budget_tokens"], ctx.settings["n_ctx"]
    n_pairs = ctx.settings["hf_pairs"][shape]
    pairs = speed_pairs(max(2, n_pairs))[:n_pairs]
    data["rows"] = []
    auto.from_pretrained = random_model
    try:
        t0 = time.perf_counter()
        model = TransformersRank1(folder, device=device, dtype="float16", max_think_tokens=budget, n_ctx=n_ctx)
        load_s = time.perf_counter() - t0
    finally:
        if own is not None:
            auto.from_pretrained = own
        else:
            del auto.from_pretrained
    try:
        model.score_pairs(pairs[:1], config=ScoringConfig(max_think_tokens=4, n_ctx=n_ctx))  # warm-up
        busy = background_busy(ctx)
        start = time.perf_counter()
        results = model.score_pairs(pairs)
        seconds = time.perf_counter() - start
        stats = model.last_stats
        row = {"shape": shape, "type": "float16", "engine": "transformers", "device": model.device, "parallel": 1,
               "pairs": len(pairs), "budget": budget, "seconds": round(seconds, 3), "load_s": round(load_s, 2),
               "generated": stats.generated_tokens, "prompt": stats.prompt_tokens, "pairs_s": len(pairs) / seconds,
               "gen_tok_s": stats.generated_tokens / seconds, "prompt_tok_s": stats.prompt_tokens / seconds,
               "all_budget": all(r.n_tokens == budget for r in results),
               "background_busy": busy or background_busy(ctx)}
        data["rows"].append(row)
        data.save()
        print(f"transformers {shape}: {row['pairs_s']:.2f} pairs/s, {row['gen_tok_s']:.0f} generated tok/s",
              flush=True)
    finally:
        model.close()


# --- llama-batched-bench ---------------------------------------------------------------------------------------------
def step_batched_bench(ctx: Ctx, data: Data) -> None:
    """llama.cpp's own batched decoding benchmark, compiled against the libraries the build made, on the speed runs'
    random GGUFs: prompt of 256 tokens and 128 generated per sequence (the rehearsal: 64 and 8), at each parallel
    setting. It reads back one logits row per sequence and samples nothing: the device's ceiling."""
    exe = ctx.work / "llama-batched-bench"
    src = ctx.work / "llama-src"
    t0 = time.perf_counter()
    status, text = compile_batched_bench(ctx, src, exe)
    data["compile"] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "output": text[-1500:]}
    data.save()
    if status != 0:
        data["failed"] = f"llama-batched-bench did not compile: {text[-300:]}"
        return
    npp, ntg = (256, 128) if ctx.gpu else (64, 8)
    npl = ",".join(str(p) for p in ctx.settings["parallel"])
    data["runs"] = []
    for shape in speed_shapes(ctx):
        for gguf_type in ctx.settings["types"]:
            model = ctx.random_dir / f"random-{shape}-{gguf_type}.gguf"
            if not model.is_file() or ctx.left() < 15:
                data["runs"].append({"shape": shape, "type": gguf_type,
                                     "not_run": "no such GGUF" if not model.is_file() else "the step's time guard"})
                continue
            n_ctx = (npp + ntg) * max(ctx.settings["parallel"])
            cmd = [str(exe), "-m", str(model), "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-npp", str(npp),
                   "-ntg", str(ntg), "-npl", npl, "-ngl", "99" if ctx.gpu else "0", "-t", str(ctx.nproc)]
            t0 = time.perf_counter()
            code, out = sh(cmd, timeout=max(5, ctx.left() - 5))
            data["runs"].append({"shape": shape, "type": gguf_type, "command": " ".join(cmd), "status": code,
                                 "seconds": round(time.perf_counter() - t0, 1),
                                 "table": [line for line in out.splitlines() if line.startswith("|")]})
            data.save()
            print("\n".join(data["runs"][-1]["table"]) or out[-800:], flush=True)


def compile_batched_bench(ctx: Ctx, src: Path, exe: Path) -> tuple[int, str]:
    """Compile ``tools/batched-bench/batched-bench.cpp`` against the build's libraries: llama-cpp-python builds
    llama.cpp's common library (``libllama-common``) beside libllama and libggml, but none of llama.cpp's tools."""
    llama = src / "vendor" / "llama.cpp"
    build = ctx.work / "llama-build"
    bin_dir = build / "bin"
    statics = sorted(str(p) for p in build.rglob("*.a"))
    # libggml.so brings the backends (CPU, CUDA) itself; the CUDA runtime libraries are found at run time
    shared = [f"-l:lib{name}.so" for name in ("llama-common", "llama", "ggml", "ggml-base")]
    tool = llama / "tools" / "batched-bench"
    cmd = ["g++", "-O2", "-std=c++17", "-o", str(exe), str(tool / "main.cpp"), str(tool / "batched-bench.cpp"),
           f"-I{tool}", f"-I{llama / 'common'}", f"-I{llama / 'include'}", f"-I{llama / 'ggml' / 'include'}",
           f"-I{llama / 'vendor'}", f"-L{bin_dir}", *shared, "-Wl,--start-group", *statics, "-Wl,--end-group",
           f"-Wl,-rpath,{bin_dir}", f"-Wl,-rpath-link,{bin_dir}", "-Wl,--allow-shlib-undefined", "-lpthread", "-ldl"]
    return sh(cmd, timeout=max(10, ctx.left() - 10))


# --- entry -----------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    parser.add_argument("--ctx", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--name", default=None, help="the data file's name (default: the step's)")
    parser.add_argument("--which", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--shape", default=None)
    parser.add_argument("--type", default=None)
    args = parser.parse_args()
    raw = json.loads(args.ctx.read_text())
    ctx = Ctx(raw["mode"], Path(raw["root"]), Path(raw["work"]), Path(raw["carry"]), Path(raw["out"]), raw["call"],
              raw["settings"], raw["nproc"], args.deadline)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama.cpp").setLevel(logging.ERROR)  # its chatter would bury the step's own lines
    data = Data(ctx, args.name or args.step)
    steps: dict[str, Callable[[], None]] = {
        "machine": lambda: step_machine(ctx, data),
        "build": lambda: step_build(ctx, data),
        "random-ggufs": lambda: step_random_ggufs(ctx, data),
        "checkpoints": lambda: step_checkpoints(ctx, data),
        "fixtures": lambda: step_fixtures(ctx, data),
        "fidelity": lambda: step_fidelity(ctx, data),
        "fidelity-llama": lambda: step_fidelity_llama(ctx, data, args.which),
        "fidelity-hf": lambda: step_fidelity_hf(ctx, data),
        "speed-small": lambda: step_speed(ctx, data, "speed-small"),
        "speed-large": lambda: step_speed(ctx, data, "speed-large"),
        "speed-run": lambda: step_speed_run(ctx, data, args.model, args.shape, args.type),
        "overhead": lambda: step_overhead(ctx, data),
        "transformers-speed": lambda: step_transformers_speed(ctx, data),
        "hf-speed-run": lambda: step_hf_speed_run(ctx, data, args.shape),
        "batched-bench": lambda: step_batched_bench(ctx, data),
    }
    if args.step not in steps:
        parser.error(f"unknown step {args.step}")
    try:
        steps[args.step]()
    except Exception as exc:
        data.update(failed=f"{type(exc).__name__}: {str(exc)[:500]}", ended=True, ended_at=time.time())
        data.save()
        raise
    data.update(ended=True, ended_at=time.time())
    data.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
