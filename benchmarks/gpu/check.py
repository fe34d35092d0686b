"""The GPU check's driver: runs each step in its own process under a time guard, records what each did, and writes
``gpu.md`` and ``gpu.json`` after every step (so a command stopped at its limit still leaves honest partial results).

Run it through ``benchmarks/gpu_check.sh`` (which installs the carried wheels first). Steps, in order of priority:

=================  =====================================================================================================
checkpoints        (in the background, from the start) the behaving fixtures, rebuilt from their shipped weights, and
                   the checkpoints derived from them for the vLLM judge tests' rare cases
random-ggufs       (in the background, from the start) random-weight GGUFs in rank1-0.5b's and rank1-7b's shapes: F16
                   at once, Q4_K_M (llama.cpp's quantizer) once the build is done
machine            date, GPU, driver, CUDA compiler, CMake, cores, Python, torch, transformers
build              llama-cpp-python from the carried sources (``-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90``, all cores)
fixtures           F16 and Q4_K_M exports of those checkpoints with our exporter
fidelity           the budget cases of the vLLM judge tests: llama.cpp CUDA (all layers; half the layers) against
                   llama.cpp CPU on the same GGUF and against the transformers backend in float16 on CUDA; fails
                   when a comparison misses its bar (``steps.bar_for``)
speed-small        rank1-local on CUDA, random rank1-0.5b shape, Q4_K_M and F16, parallel 1/8/32/64; per-step timings
overhead           what one step's host work costs: logits rows copied, argmax over the vocabulary, top-20, device to
                   host copies
speed-large        the same in rank1-7b's shape
transformers-speed the transformers backend (float16, CUDA) on the same pairs, both shapes
batched-bench      llama.cpp's own ``llama-batched-bench``, built against the same libraries, same shapes
=================  =====================================================================================================

A step that did not run says so and why; nothing is recorded as passed unless it ran. Results of earlier calls on the
same machine (a warm machine keeps ``.gpu-work/``) are kept and shown with the call they came from; ``--redo`` runs
them again (``--rebuild`` the build too).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.gpu.report import render

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    cap_s: int  # the most this step may take
    min_s: int  # below this much time left it is not started
    needs: tuple[str, ...] = ()
    background: bool = False  # started in the background; runs until it ends or the check does


STEPS = (
    Step("checkpoints", "fixture checkpoints (in the background)", 0, 0, background=True),
    Step("random-ggufs", "random-weight GGUFs for the speed runs (in the background)", 0, 0, background=True),
    Step("machine", "the machine", 60, 5),
    Step("build", "build llama-cpp-python from the carried sources", 390, 60),
    Step("fixtures", "F16 / Q4_K_M exports of the fixture checkpoints", 150, 20, ("build",)),
    Step("fidelity", "fidelity: the vLLM judge tests' budget cases", 180, 30, ("fixtures",)),
    Step("speed-small", "speed: rank1-local, small shape", 150, 30, ("build",)),
    Step("overhead", "host work per decode step", 60, 10),
    Step("speed-large", "speed: rank1-local, large shape", 200, 40, ("build",)),
    Step("transformers-speed", "speed: the transformers backend", 120, 30, ("build",)),
    Step("batched-bench", "llama.cpp's llama-batched-bench", 120, 30, ("build",)),
)
BY_NAME = {s.name: s for s in STEPS}


@dataclass
class Settings:
    """What a mode runs: the GPU check, or its CPU rehearsal (GGML_CUDA off, tiny shapes)."""

    mode: str
    budget_s: int
    shapes: dict[str, str]  # speed step -> random GGUF shape
    types: tuple[str, ...] = ("Q4_K_M", "F16")
    parallel: tuple[int, ...] = (1, 8, 32, 64)
    budget_tokens: int = 128
    n_ctx: int = 1024
    fidelity_cases: tuple[str, ...] = ()  # empty: all
    fidelity_types: tuple[str, ...] = ("F16", "Q4_K_M")
    hf_pairs: dict[str, int] = field(default_factory=dict)  # shape -> pairs for the (serial) transformers backend
    cap_factor: float = 1.0  # step caps are sized for the GPU machine (16 cores); the rehearsal's 2 cores need more
    build_cap_s: int | None = None

    def cap(self, step: Step) -> float:
        if step.name == "build" and self.build_cap_s:
            return self.build_cap_s
        return step.cap_s * self.cap_factor

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"


def settings_for(mode: str, budget_s: int | None) -> Settings:
    if mode == "gpu":
        return Settings("gpu", budget_s or 540, {"speed-small": "rank1-0.5b", "speed-large": "rank1-7b"},
                        hf_pairs={"rank1-0.5b": 8, "rank1-7b": 4})
    return Settings("cpu-rehearsal", budget_s or 3000, {"speed-small": "tiny", "speed-large": "tiny"},
                    parallel=(1, 4), budget_tokens=8, n_ctx=512,
                    fidelity_cases=("closes normally", "forced, cut mid-sentence", "prompt longer than the context"),
                    hf_pairs={"tiny": 2}, cap_factor=4.0, build_cap_s=1500)


class Run:
    """One call of the check: its steps' results, the clock, and the files it writes."""

    def __init__(self, settings: Settings, work: Path, out: Path, carry: Path, redo: bool,
                 only: set[str] | None, rebuild: bool = False) -> None:
        self.settings, self.work, self.out, self.carry, self.redo, self.only = settings, work, out, carry, redo, only
        self.rebuild = rebuild
        self.started = time.time()
        self.deadline = self.started + settings.budget_s
        self.call = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started))
        self.results_dir = work / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.background: dict[str, tuple[subprocess.Popen, float]] = {}
        self.ctx_file = work / "ctx.json"
        self.ctx_file.write_text(json.dumps({
            "mode": settings.mode, "root": str(ROOT), "work": str(work), "carry": str(carry), "out": str(out),
            "call": self.call, "settings": asdict(settings), "nproc": os.cpu_count() or 1}, indent=2))

    # --- results ---------------------------------------------------------------------------------------------
    def result_file(self, name: str) -> Path:
        return self.results_dir / f"{name}.json"

    def load(self, name: str) -> dict | None:
        try:
            result = json.loads(self.result_file(name).read_text())
        except (OSError, ValueError):
            return None
        return result if result.get("mode") == self.settings.mode else None

    def save(self, name: str, result: dict) -> None:
        result = {"step": name, "mode": self.settings.mode, "call": self.call, **result}
        part = self.result_file(name).with_suffix(".part")
        part.write_text(json.dumps(result, indent=2, default=str))
        part.replace(self.result_file(name))

    def ok(self, name: str) -> bool:
        result = self.load(name)
        return bool(result and result.get("status") == "ok")

    def render(self) -> None:
        results = {s.name: self.load(s.name) for s in STEPS}
        for name, result in results.items():
            if result and result.get("status") == "running" and result.get("call") != self.call:
                results[name] = {**result, "status": "stopped",
                                 "reason": f"the command of call {result.get('call')} was stopped during this step"}
        meta = {"call": self.call, "mode": self.settings.mode, "host": socket.gethostname(),
                "budget_s": self.settings.budget_s, "elapsed_s": round(time.time() - self.started, 1),
                "settings": asdict(self.settings)}
        md, data = render(STEPS, results, meta)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu.md", md), ("gpu.json", json.dumps(data, indent=2, default=str) + "\n")):
            part = self.out / (name + ".part")
            part.write_text(text)
            part.replace(self.out / name)

    # --- running steps ---------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def worker(self, name: str, deadline: float, extra: list[str] | None = None) -> list[str]:
        return [sys.executable, "-m", "benchmarks.gpu.steps", name, "--ctx", str(self.ctx_file),
                "--deadline", f"{deadline:.1f}", *(extra or [])]

    def run_step(self, step: Step) -> None:
        previous = self.load(step.name)
        if self.only is not None and step.name not in self.only:
            if not previous:
                self.save(step.name, {"status": "not run", "reason": "not asked for in this call (--only)"})
            return
        redo = self.rebuild if step.name == "build" else self.redo
        if previous and previous.get("status") == "ok" and not redo and step.name != "machine":
            if step.name != "build" or (self.work / "llama-site" / "llama_cpp").is_dir():
                print(f"[check] {step.name}: kept from call {previous['call']} on this machine", flush=True)
                return
        missing = [n for n in step.needs if not self.ok(n)]
        if missing:
            self.save(step.name, {"status": "not run", "reason": f"needs {', '.join(missing)}, which did not pass"})
            return
        if step.background:
            self.start_background(step.name)
            return
        left = self.left()
        if left < step.min_s:
            self.save(step.name, {"status": "not run", "reason": f"time budget: {left:.0f} s left of "
                                                                 f"{self.settings.budget_s} s, the step needs at "
                                                                 f"least {step.min_s} s"})
            return
        limit = min(self.settings.cap(step), left)
        (self.work / "data" / f"{step.name}.json").unlink(missing_ok=True)  # never report an earlier call's data
        self.save(step.name, {"status": "running", "reason": "started; if this is the final word, the command was "
                                                            "stopped during this step", "limit_s": round(limit)})
        self.render()
        print(f"[check] {step.name}: {step.title} (at most {limit:.0f} s)", flush=True)
        start = time.time()
        status, reason = run_limited(self.worker(step.name, start + limit), limit, self.work / "logs" / step.name)
        seconds = time.time() - start
        data = self.read_data(step.name)
        if status == "ok" and data.get("failed"):
            status, reason = "failed", data["failed"]
        self.save(step.name, {"status": status, "reason": reason, "seconds": round(seconds, 1),
                              "limit_s": round(limit), "data": data})
        print(f"[check] {step.name}: {status} in {seconds:.0f} s{': ' + reason if reason else ''}", flush=True)
        self.render()

    def read_data(self, name: str) -> dict:
        try:
            return json.loads((self.work / "data" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def start_background(self, name: str) -> None:
        """Start a step that runs beside the next ones (they wait for what they need from it)."""
        (self.work / "data").mkdir(parents=True, exist_ok=True)
        (self.work / "data" / f"{name}.json").unlink(missing_ok=True)
        self.save(name, {"status": "running", "reason": "running in the background; if this is the final word, the "
                                                        "command was stopped before it ended"})
        log = open(self.work / "logs" / f"{name}.log", "w")
        proc = subprocess.Popen(self.worker(name, self.deadline), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: os.nice(10))
        self.background[name] = (proc, time.time())
        print(f"[check] {name}: started in the background", flush=True)

    def finish_background(self, stop_running: bool) -> None:
        """Record the result of each background job that ended (with ``stop_running``, stop the others first)."""
        for name, (proc, started) in list(self.background.items()):
            if proc.poll() is None and not stop_running:
                continue
            status, reason = "ok", ""
            if proc.poll() is None:
                stop(proc)
                status, reason = "timed out", "still running when the check ended; stopped"
            elif proc.returncode != 0:
                status, reason = "failed", f"exit status {proc.returncode} (see logs/{name}.log)"
            data = self.read_data(name)
            if status == "ok" and data.get("failed"):
                status, reason = "failed", data["failed"]
            seconds = (data.get("ended_at") or time.time()) - started
            self.save(name, {"status": status, "reason": reason, "seconds": round(seconds, 1), "data": data})
            print(f"[check] {name}: {status} in the background after {seconds:.0f} s"
                  + (f": {reason}" if reason else ""), flush=True)
            del self.background[name]
            self.render()

    def run(self) -> int:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "data").mkdir(parents=True, exist_ok=True)
        try:
            for step in STEPS:
                self.finish_background(stop_running=False)
                self.run_step(step)
            while self.background and self.left() > 5:  # jobs asked for (--only), or whose user failed: let them end
                self.finish_background(stop_running=False)
                time.sleep(1)
        finally:
            self.finish_background(stop_running=True)
            self.render()
        failed = [s.name for s in STEPS if (self.load(s.name) or {}).get("status") not in ("ok", "not run")]
        print(f"[check] done in {time.time() - self.started:.0f} s; results in {self.out}"
              + (f"; not passed: {', '.join(failed)}" if failed else ""), flush=True)
        return 1 if failed else 0


def stop(proc: subprocess.Popen) -> None:
    """Stop a step's process group: SIGTERM, then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_limited(cmd: list[str], limit: float, log_base: Path) -> tuple[str, str]:
    """Run ``cmd`` in its own process group for at most ``limit`` seconds, its output going to our output and to
    ``log_base.log``; (status, reason)."""
    log_base.parent.mkdir(parents=True, exist_ok=True)
    with open(log_base.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        end = time.time() + limit
        tail = b""
        while True:
            chunk = proc.stdout.read() or b""
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk.decode("utf-8", "replace"))
                tail = (tail + chunk)[-2000:]
            if proc.poll() is not None:
                chunk = proc.stdout.read() or b""
                sys.stdout.buffer.write(chunk)
                log.write(chunk.decode("utf-8", "replace"))
                tail = (tail + chunk)[-2000:]
                break
            if time.time() > end:
                stop(proc)
                return "timed out", f"stopped by its time guard after {limit:.0f} s"
            time.sleep(0.2)
    if proc.returncode != 0:
        last = [line for line in tail.decode("utf-8", "replace").splitlines() if line.strip()][-3:]
        return "failed", f"exit status {proc.returncode}: " + " | ".join(last)[-600:]
    return "ok", ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="build with GGML_CUDA off and run every step on tiny shapes, on the CPU")
    parser.add_argument("--budget-s", type=int, default=None,
                        help="seconds for the whole check (default 540 on the GPU, 3000 in the rehearsal)")
    parser.add_argument("--only", default=None, help="comma-separated steps to run in this call")
    parser.add_argument("--redo", action="store_true",
                        help="run steps again that passed in an earlier call on this machine (the build: --rebuild)")
    parser.add_argument("--rebuild", action="store_true", help="build llama-cpp-python again")
    parser.add_argument("--work", type=Path, default=ROOT / ".gpu-work")
    parser.add_argument("--out", type=Path, default=None, help="where gpu.md and gpu.json go (default: $OUT)")
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(BY_NAME)}")
    out = args.out or Path(os.environ.get("OUT") or args.work / "out")
    settings = settings_for("cpu-rehearsal" if args.cpu_rehearsal else "gpu", args.budget_s)
    return Run(settings, args.work.resolve(), out.resolve(), args.carry.resolve(), args.redo, only, args.rebuild).run()


if __name__ == "__main__":
    sys.exit(main())
