"""The GPU check's CPU-side parts: what the carry folder keeps, that the check never records a step as passed that did
not run, the cases it shares with the vLLM judge tests, and the per-step timing arithmetic. The check itself is
rehearsed end to end with ``benchmarks/gpu_check.sh --cpu-rehearsal`` (it builds llama-cpp-python: minutes)."""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.gpu import check, prepare, steps
from benchmarks.gpu.report import render
from benchmarks.gpu.timing import Bucket

pytestmark = pytest.mark.quick
ROOT = Path(__file__).resolve().parents[1]
LLAMA = "vendor/llama.cpp"


@pytest.mark.parametrize("rel, kept", [
    (f"{LLAMA}/ggml/src/ggml-cuda/mmq.cu", True),
    (f"{LLAMA}/ggml/src/ggml-cuda/template-instances/fattn-vec-instance-f16-f16.cu", True),
    (f"{LLAMA}/ggml/src/ggml-cpu/arch/x86/quants.c", True),
    (f"{LLAMA}/ggml/src/ggml.c", True),
    (f"{LLAMA}/ggml/src/ggml-backend.cpp", True),
    (f"{LLAMA}/ggml/src/ggml-vulkan/ggml-vulkan.cpp", False),
    (f"{LLAMA}/ggml/src/ggml-metal/ggml-metal.m", False),
    (f"{LLAMA}/ggml/src/ggml-sycl/ggml-sycl.cpp", False),
    (f"{LLAMA}/ggml/src/ggml-opencl/ggml-opencl.cpp", False),
    (f"{LLAMA}/ggml/src/ggml-cann/aclnn_ops.cpp", False),
    (f"{LLAMA}/ggml/src/ggml-hip/CMakeLists.txt", False),
    (f"{LLAMA}/ggml/src/ggml-musa/CMakeLists.txt", False),
    (f"{LLAMA}/ggml/src/ggml-rpc/ggml-rpc.cpp", False),
    (f"{LLAMA}/src/llama.cpp", True),
    (f"{LLAMA}/common/arg.cpp", True),
    (f"{LLAMA}/vendor/nlohmann/json.hpp", True),
    (f"{LLAMA}/tools/batched-bench/batched-bench.cpp", True),
    (f"{LLAMA}/tools/server/server.cpp", False),
    (f"{LLAMA}/tools/mtmd/clip.cpp", False),
    (f"{LLAMA}/models/ggml-vocab-qwen2.gguf", True),
    (f"{LLAMA}/models/ggml-vocab-qwen2.gguf.out", True),
    (f"{LLAMA}/models/ggml-vocab-llama-bpe.gguf.inp", True),
    (f"{LLAMA}/models/ggml-vocab-gemma-4.gguf", False),
    (f"{LLAMA}/docs/build.md", False),
    (f"{LLAMA}/examples/simple/simple.cpp", False),
    (f"{LLAMA}/tests/test-backend-ops.cpp", False),
    (f"{LLAMA}/gguf-py/gguf/gguf.py", False),
    ("llama_cpp/llama_cpp.py", True),
    ("CMakeLists.txt", True),
    ("pyproject.toml", True),
    ("docs/index.md", False),
    ("examples/high_level_api/fastapi_server.py", False),
    ("tests/test_llama.py", False),
])
def test_the_carry_keeps_what_the_cuda_build_needs_and_drops_the_rest(rel, kept):
    assert prepare.keep(rel) is kept


def test_the_carry_folder_if_prepared_is_complete_and_fits():
    carry = ROOT / ".gpu-carry"
    if not (carry / "MANIFEST.json").is_file():
        pytest.skip("no .gpu-carry here (python -m benchmarks.gpu.prepare makes it)")
    assert prepare.check_carry(carry) == []
    size = prepare.tree_bytes(carry) + (prepare.working_tree_bytes() or 0)
    assert size <= prepare.LIMIT_MIB << 20, f"{size / 2**20:.1f} MiB would travel"
    cuda = carry / prepare.SDIST_DIR / LLAMA / "ggml" / "src" / "ggml-cuda"
    assert len(list(cuda.glob("template-instances/*.cu"))) > 50
    assert not (carry / prepare.SDIST_DIR / LLAMA / "ggml" / "src" / "ggml-vulkan").exists()


def test_the_cases_are_the_vllm_judge_tests_cases():
    """benchmarks/gpu/cases.py repeats the test's CASES (the test module needs vLLM to import): same names, same
    checkpoints and budgets, in the same order."""
    from benchmarks.gpu.cases import cases

    tree = ast.parse((ROOT / "tests" / "test_vllm_judge.py").read_text())
    (table,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "CASES" for t in node.targets)]
    in_test = {ast.literal_eval(k): (ast.literal_eval(v.elts[0]), ast.literal_eval(v.elts[1]))
               for k, v in zip(table.keys, table.values, strict=True)}
    ours = {name: (checkpoint, budget) for name, (checkpoint, budget, _pairs) in cases().items()}
    assert list(ours.items()) == list(in_test.items())


def _run(tmp_path: Path, budget_s: int, only: set[str] | None = None) -> check.Run:
    settings = check.settings_for("cpu-rehearsal", budget_s)
    return check.Run(settings, tmp_path / "work", tmp_path / "out", tmp_path / "carry", redo=False, only=only)


def test_a_step_whose_prerequisite_did_not_pass_is_not_run_and_says_why(tmp_path):
    run = _run(tmp_path, 600)
    run.save("build", {"status": "failed", "reason": "compiler error"})
    run.run_step(check.BY_NAME["fixtures"])
    result = run.load("fixtures")
    assert result["status"] == "not run" and "build" in result["reason"]


def test_a_step_that_does_not_fit_the_time_left_is_not_run_and_says_why(tmp_path):
    run = _run(tmp_path, 3)
    run.run_step(check.BY_NAME["overhead"])
    result = run.load("overhead")
    assert result["status"] == "not run" and "time budget" in result["reason"]


def test_a_step_stopped_by_its_time_guard_is_recorded_as_timed_out(tmp_path):
    start = __import__("time").time()
    status, reason = check.run_limited([sys.executable, "-c", "import time; time.sleep(30)"], 1.0,
                                       tmp_path / "logs" / "sleeper")
    assert status == "timed out" and "1 s" in reason
    assert __import__("time").time() - start < 15


def test_a_failing_step_is_recorded_as_failed_with_its_last_words(tmp_path):
    status, reason = check.run_limited([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30.0,
                                       tmp_path / "logs" / "failer")
    assert status == "failed" and "exit status 3" in reason and "boom" in reason


def test_the_report_lists_every_step_and_passes_none_that_did_not_run(tmp_path):
    run = _run(tmp_path, 600)
    run.save("machine", {"status": "ok", "seconds": 3.0, "data": {"date": "today", "nproc": 2}})
    run.save("build", {"status": "timed out", "reason": "stopped by its time guard after 390 s"})
    run.render()
    md = (tmp_path / "out" / "gpu.md").read_text()
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert "CPU REHEARSAL" in md and "not a GPU result" in md
    statuses = {name: step["status"] for name, step in data["steps"].items()}
    assert statuses["machine"] == "ok" and statuses["build"] == "timed out"
    assert set(statuses) == {s.name for s in check.STEPS}
    assert all(status == "not run" for name, status in statuses.items() if name not in ("machine", "build"))
    for step in check.STEPS:
        assert f"| {step.name} |" in md


def test_a_gpu_report_has_no_rehearsal_banner():
    md, _ = render(check.STEPS, {}, {"mode": "gpu", "call": "c", "host": "h", "budget_s": 540, "elapsed_s": 1.0})
    assert "REHEARSAL" not in md and md.count("| not run |") == len(check.STEPS)


def test_step_timings_split_device_and_host_time():
    bucket = Bucket(steps=4, rows=32, tokens=32, step_s=0.040, decode_s=0.004, wait_s=0.020, engine_s=0.030)
    s = bucket.summary()
    assert s["step_ms"] == pytest.approx(10.0) and s["device_ms"] == pytest.approx(6.0)
    assert s["host_ms"] == pytest.approx(4.0) and s["readout_ms"] == pytest.approx(1.5)
    assert s["scheduler_ms"] == pytest.approx(2.5) and s["host_share"] == pytest.approx(0.4)
    assert s["host_us_per_row"] == pytest.approx(500.0)


def test_a_step_an_earlier_call_was_stopped_in_is_reported_as_stopped(tmp_path):
    earlier = _run(tmp_path, 600)
    earlier.save("fidelity", {"status": "running", "reason": "started"})
    later = _run(tmp_path, 600)
    later.call = "a later call"
    later.render()
    step = json.loads((tmp_path / "out" / "gpu.json").read_text())["steps"]["fidelity"]
    assert step["status"] == "stopped" and earlier.call in step["reason"]


# --- the fidelity step's verdict, on constructed runs (no llama.cpp, no GPU) ---------------------------------------
def _results(n: int = 12, **changes: dict) -> list[dict]:
    """``n`` pairs of one run; ``changes`` maps a pair index (as ``p3``) to the fields it changes."""
    rows = [{"score": 0.9 if i % 2 else 0.1, "reasoning": f"chain {i}.", "n_tokens": 20, "forced": False,
             "too_long": False} for i in range(n)]
    for key, fields in changes.items():
        rows[int(key[1:])].update(fields)
    return rows


def _runs(case: str, **overrides: list[dict]) -> dict:
    """Every run the fidelity step compares, all agreeing, unless ``overrides`` (``F16_gpu_all`` …) say otherwise."""
    runs = {f"{case}|hf16": {"device": "transformers cpu float16", "results": overrides.pop("hf16", _results())}}
    for gguf_type in ("F16", "Q4_K_M"):
        for label in ("cpu", "gpu-all", "gpu-half"):
            name = f"{gguf_type}_{label.replace('-', '_')}"
            runs[f"{case}|{gguf_type}|{label}"] = {"device": label, "results": overrides.pop(name, _results())}
    assert not overrides
    return runs


CASE = {"closes normally": ("behaving", 64, [])}
TYPES = ("F16", "Q4_K_M")


def _failures(**overrides: list[dict]) -> list[str]:
    return steps.judge_fidelity(_runs("closes normally", **overrides), CASE, TYPES)[1]


def test_agreeing_fidelity_runs_pass_and_a_quantized_gguf_against_float16_is_not_judged():
    rows, failures = steps.judge_fidelity(_runs("closes normally"), CASE, TYPES)
    assert failures == [] and len(rows) == 2 * len(steps.COMPARISONS)
    verdicts = {(r["type"], r["run"], r["against"]): r["verdict"] for r in rows}
    assert verdicts[("Q4_K_M", "gpu-all", "hf16")].startswith("not judged")
    assert all(v == "ok" for (t, _, against), v in verdicts.items() if against == "cpu" or t == "F16")


@pytest.mark.parametrize("overrides, words", [
    ({"F16_gpu_all": _results(p3={"score": 0.45})}, "F16 | gpu-all vs cpu: decisions differ on 1 of 12 pairs"),
    ({"Q4_K_M_gpu_half": _results(p5={"reasoning": "another chain."})},
     "Q4_K_M | gpu-half vs cpu: reasoning differs on 1 of 12 pairs (at most 0)"),
    ({"F16_gpu_all": _results(p0={"n_tokens": 21})}, "F16 | gpu-all vs cpu: reasoning differs on 1 of 12"),
    # 0.9 -> 0.92: the same decision, 0.24 in log-odds, over the same-file bar of 0.1
    ({"F16_gpu_half": _results(p1={"score": 0.92})}, "F16 | gpu-half vs cpu: |Δlog-odds| 0.245 > 0.1"),
    ({"Q4_K_M_gpu_all": _results(p1={"score": 0.95})}, "Q4_K_M | gpu-all vs cpu: |Δlog-odds| 0.747 > 0.5"),
    # transformers float16 may change a quarter of the chains (3 of 12), not four
    ({"hf16": _results(**{f"p{i}": {"reasoning": "x.", "score": 0.5} for i in range(4)})},
     "F16 | cpu vs hf16: reasoning differs on 4 of 12 pairs (at most 3)"),
    ({"hf16": _results(p2={"score": 0.6})}, "F16 | cpu vs hf16: decisions differ on 1 of 12 pairs"),
    ({"F16_cpu": None}, "F16 | gpu-all vs cpu: cpu did not run"),
])
def test_the_fidelity_step_fails_on_each_disagreement(overrides, words):
    missing = [k for k, v in overrides.items() if v is None]
    runs = _runs("closes normally", **{k: v for k, v in overrides.items() if v is not None})
    for name in missing:  # a run that did not happen
        gguf_type, label = name.split("_", 1)
        del runs[f"closes normally|{gguf_type}|{label}"]
    failures = steps.judge_fidelity(runs, CASE, TYPES)[1]
    assert any(words in f for f in failures), failures


def test_float16_chain_changes_within_the_bar_pass_and_their_decisions_are_not_compared():
    changed = {f"p{i}": {"reasoning": "x.", "score": 0.5} for i in range(3)}  # 3 of 12, decisions flipped too
    assert _failures(hf16=_results(**changed)) == []
    assert _failures(Q4_K_M_gpu_all=_results(p2={"score": 0.6})) != []  # the same file allows no such change


def test_the_fidelity_step_records_failed_and_the_report_marks_it(tmp_path, monkeypatch):
    """The step itself (its child processes replaced by their data files): a disagreement fails the step, and
    gpu.md shows which comparison and why."""
    settings = asdict(check.settings_for("cpu-rehearsal", 600))
    ctx = steps.Ctx("cpu-rehearsal", ROOT, tmp_path / "work", tmp_path / "carry", tmp_path / "out", "c", settings, 2,
                    1e12)
    runs = _runs("closes normally", F16_gpu_all=_results(p3={"score": 0.45}))
    data_dir = ctx.work / "data"
    data_dir.mkdir(parents=True)
    for child, which in (("fidelity-cpu", "|cpu"), ("fidelity-gpu", "|gpu-"), ("fidelity-hf", "|hf16")):
        (data_dir / f"{child}.json").write_text(json.dumps({"runs": {k: v for k, v in runs.items() if which in k}}))
    monkeypatch.setattr(steps, "_run_children", lambda ctx, jobs, parallel: dict.fromkeys(jobs, "ok"))
    monkeypatch.setattr(steps, "_fidelity_cases", lambda ctx: CASE)
    data = steps.Data(ctx, "fidelity")
    steps.step_fidelity(ctx, data)
    # the flipped pair misses two bars: against the CPU run and against transformers
    assert data["failed"].startswith("2 comparison(s) missed their bar: closes normally | F16 | gpu-all vs cpu")
    md, _ = render(check.STEPS, {"fidelity": {"status": "failed", "reason": data["failed"], "data": dict(data)}},
                   {"mode": "gpu", "call": "c", "host": "h", "budget_s": 540, "elapsed_s": 1.0})
    assert "**✗** 11/12" in md and "- closes normally | F16 | gpu-all vs cpu: decisions differ on 1 of 12" in md
    assert "fidelity verdict: 5 of 7 judged comparisons met their bar, **2 did not**" in md
