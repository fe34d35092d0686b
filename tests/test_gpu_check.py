"""The GPU check's CPU-side parts: what the carry folder keeps, that the check never records a step as passed that did
not run, the cases it shares with the vLLM judge tests, and the per-step timing arithmetic. The check itself is
rehearsed end to end with ``benchmarks/gpu_check.sh --cpu-rehearsal`` (it builds llama-cpp-python: minutes)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import check, prepare
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
