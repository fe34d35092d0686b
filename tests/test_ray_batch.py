"""Batch scoring on a local Ray cluster (2 CPUs, each worker 1 thread) on the behaving fixture: the result against a
single-process run of the same pairs, a worker killed mid-run, a driver killed mid-run and resumed, and a model the
nodes cannot find. ``python -m pytest -q -m ray tests``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import engine
from ray_support import BUDGET, N_CTX, PARALLEL, by_key, compare_runs, processes, read_run, write_pairs

from rank1_local.cli.main import main

pytestmark = pytest.mark.ray

SCORING = ["--max-think-tokens", str(BUDGET), "--n-ctx", str(N_CTX), "--parallel", str(PARALLEL)]
WORKER_TITLE = "MapBatches(PairScorer)"
TOLERANCE = 1e-3  # llama.cpp's CPU kernels are not batch-invariant: scores may move in the last digits


@pytest.fixture(scope="module")
def model(exported):
    return str(exported("behaving", "Q8_0"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-pairs") / "pairs.jsonl"
    return path, write_pairs(path)


@pytest.fixture(scope="module")
def reference(model, pairs, tmp_path_factory):
    """The single-process run of the same pairs (1 thread, as each Ray worker): rows and header."""
    out = tmp_path_factory.mktemp("ray-reference") / "single.jsonl"
    assert main(["-q", "rerank", "--model", model, "--pairs", str(pairs[0]), "--output", str(out), "--threads", "1",
                 *SCORING]) == 0
    return read_run(out), json.loads(out.with_name("single.header.json").read_text())


def ray_args(model, pairs_file, out, *extra):
    return ["-q", "rerank", "--model", model, "--pairs", str(pairs_file), "--output", str(out), *SCORING, "--ray",
            "--workers", "2", "--threads-per-worker", "1", *extra]


def test_two_workers_score_every_pair_once_as_one_process_does(ray_cluster, model, pairs, reference, tmp_path):
    ref_rows, ref_header = reference
    out = tmp_path / "ray.jsonl"
    assert main(ray_args(model, pairs[0], out, "--pairs-per-block", "16")) == 0
    rows = read_run(out)
    worst = compare_runs(rows, ref_rows)
    assert worst <= TOLERANCE
    print(f"\n2 Ray workers vs one process, {len(rows)} pairs: max |Δscore| = {worst:.2e}")
    header = json.loads(out.with_name("ray.header.json").read_text())
    for key in ("model", "model_file", "model_bytes", "backend", "settings", "format"):
        assert header[key] == ref_header[key], key
    assert header["pairs"] == len(rows) and header["generated_tokens"] == sum(r["n_tokens"] for r in rows)
    assert "2 Ray workers" in header["device"]
    # re-running a finished run starts nothing and changes nothing
    before = out.read_bytes()
    assert main(ray_args(model, pairs[0], out)) == 0
    assert out.read_bytes() == before


def test_score_dataset_keeps_each_query_on_one_worker(ray_cluster, model, pairs, reference):
    import ray

    from rank1_local.core.config import ScoringConfig
    from rank1_local.integrations.ray import score_dataset

    rows = [json.loads(line) for line in pairs[0].read_text().splitlines()]
    ds = ray.data.from_items(rows, override_num_blocks=6)  # six blocks, every query spread over all of them
    scored = score_dataset(ds, model, ScoringConfig(max_think_tokens=BUDGET, n_ctx=N_CTX), workers=2,
                           pairs_per_block=16, parallel=PARALLEL)
    out = scored.take_all()
    assert set(out[0]) >= {"qid", "docid", "score", "reasoning", "cached", "worker", "device", "settings"}
    workers_of_query: dict[str, set[str]] = {}
    for row in out:
        workers_of_query.setdefault(row["qid"], set()).add(row["worker"])
    assert all(len(w) == 1 for w in workers_of_query.values()), "a query was split between workers"
    assert len(set().union(*workers_of_query.values())) == 2, "both workers scored"
    result_keys = list(reference[0][0])
    assert compare_runs([{k: row[k] for k in result_keys} for row in out], reference[0]) <= TOLERANCE


def _run_in_thread(args):
    result: dict[str, object] = {}

    def target():
        try:
            result["code"] = main(args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _wait_rows(out: Path, n: int, timeout: float, alive=lambda: True) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if out.exists():
            rows = out.read_bytes().count(b"\n")
            if rows >= n:
                return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} rows in {out} after {timeout} s")


def test_a_worker_killed_mid_run_is_restarted_and_every_pair_is_written_once(ray_cluster, model, pairs, reference,
                                                                            tmp_path):
    out = tmp_path / "killed.jsonl"
    thread, result = _run_in_thread(ray_args(model, pairs[0], out, "--pairs-per-block", "8"))
    written = _wait_rows(out, 8, timeout=180, alive=thread.is_alive)
    before = set(processes(WORKER_TITLE))
    assert len(before) == 2
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and result.get("code") == 0, result
    rows = read_run(out)
    assert written < len(rows), "the kill came after the run had finished"
    assert compare_runs(rows, reference[0]) <= TOLERANCE
    header = json.loads(out.with_name("killed.header.json").read_text())
    assert header["pairs"] == len(rows)


def test_a_killed_driver_resumes_with_only_the_rest_scored(ray_cluster, model, pairs, reference, tmp_path, caplog):
    out = tmp_path / "resumed.jsonl"
    args = ray_args(model, pairs[0], out, "--pairs-per-block", "8")
    # a driver of its own, on the same cluster
    cmd = [sys.executable, "-m", "rank1_local.cli.main", *[x for a in args for x in ((a, ray_cluster) if a == "--ray"
                                                                                     else (a,))]]
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_rows(out, 16, timeout=180, alive=lambda: driver.poll() is None)
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    kept = out.read_bytes()
    kept = kept[:kept.rfind(b"\n") + 1]  # a torn last line (killed mid-write) is dropped on resume
    done = len(kept.splitlines())
    assert 16 <= done < len(pairs[1])
    assert json.loads(out.with_name("resumed.header.json").read_text())["settings"]["max_think_tokens"] == BUDGET

    # the header's check still applies: other settings are refused before any worker starts
    other = [a if a != str(BUDGET) else "32" for a in args]
    assert main(other) == 2
    assert out.read_bytes()[:len(kept)] == kept

    with caplog.at_level(logging.INFO, logger="rank1_local.integrations.ray_run_file"):
        assert main(args) == 0
    todo = len(pairs[1]) - done
    assert f"{len(pairs[1])} pairs, {done} already in {out}, {todo} to score" in caplog.text
    assert f"{todo} pairs scored on 2 Ray workers" in caplog.text
    final = out.read_bytes()
    assert final.startswith(kept)
    assert compare_runs(read_run(out), reference[0]) <= TOLERANCE
    assert set(by_key(read_run(out))) == set(pairs[1])


@pytest.mark.parametrize("fixture, card", [("qwen3-reranker-behaving", None), ("qwen3", "qwen3-reranker")],
                         ids=["recognised", "named"])
def test_a_qwen3_reranker_scores_on_ray_as_in_one_process(ray_cluster, exported, fixture, card, tmp_path):
    """A Qwen3-Reranker on 2 Ray workers: recognised from its GGUF, or a plain Qwen3 GGUF under ``--card``, which
    every worker gets. Rows, scores (within 1e-3) and the header (its card included) are the single process's."""
    model = str(exported(fixture, "F32"))
    pairs_file = tmp_path / "pairs.jsonl"
    write_pairs(pairs_file, n_queries=6, per_query=4)
    scoring = [*SCORING, *(["--card", card] if card else [])]
    single, on_ray = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    assert main(["-q", "rerank", "--model", model, "--pairs", str(pairs_file), "--output", str(single), "--threads",
                 "1", *scoring]) == 0
    assert main(["-q", "rerank", "--model", model, "--pairs", str(pairs_file), "--output", str(on_ray), *scoring,
                 "--ray", "--workers", "2", "--threads-per-worker", "1", "--pairs-per-block", "8"]) == 0
    rows, ref_rows = read_run(on_ray), read_run(single)
    assert all(r["n_tokens"] == 0 for r in rows)  # the answer read at once: no reasoning
    assert compare_runs(rows, ref_rows) <= TOLERANCE
    header, ref_header = (json.loads(p.with_name(p.stem + ".header.json").read_text()) for p in (on_ray, single))
    assert header["settings"] == ref_header["settings"] and header["settings"]["card"] == "qwen3-reranker"


@pytest.mark.parametrize("what", ["missing", "not a GGUF"])
def test_a_model_the_nodes_cannot_find_fails_fast_naming_the_node(ray_cluster, pairs, tmp_path, capsys, what):
    if what == "missing":
        model, words = tmp_path / "nowhere" / "rank1.gguf", "no such file or bundle folder"
    else:
        model, words = tmp_path / "rank1.gguf", "not a GGUF file"
        model.write_bytes(b"this is no model" * 64)
    out = tmp_path / "out.jsonl"
    workers = set(processes(WORKER_TITLE))
    start = time.monotonic()
    assert main(ray_args(str(model), pairs[0], out)) == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert err.startswith("error: node ") and "cannot use the model" in err and words in err, err
    assert "Traceback" not in err
    assert took < 20, f"took {took:.1f} s"
    assert not out.exists() and not set(processes(WORKER_TITLE)) - workers  # no worker was started


def test_an_address_where_no_cluster_listens_fails_at_once(pairs, tmp_path, pytestconfig):
    engine(pytestconfig, "ray")
    from benchmarks.server_process import free_port

    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rank1_local.cli.main", "-q", "rerank", "--model", "m.gguf", "--pairs",
                          str(pairs[0]), "--output", str(tmp_path / "o.jsonl"), "--ray", address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.monotonic() - start < 60
    assert f"error: cannot join the Ray cluster at {address} (from --ray): Connection refused" in out.stderr, out.stderr


def test_a_block_whose_worker_dies_every_time_fails_the_run_after_3_retries(ray_cluster):
    """Ray Data retries the block of a dead worker without end; the run counts each block's starts across worker
    restarts and stops a block started more than 1 + 3 times, naming it."""
    import ray

    from rank1_local.core.errors import Rank1Error
    from rank1_local.integrations.ray_batch import MAX_TASK_RETRIES, BlockAttempts, PairScorer

    scorer = PairScorer.__new__(PairScorer)  # its counting alone: no model
    scorer.attempts, scorer.max_attempts = ray.remote(num_cpus=0)(BlockAttempts).remote(), 1 + MAX_TASK_RETRIES
    for _ in range(1 + MAX_TASK_RETRIES):
        scorer._count_attempt(["q7", "q7", "q8"])
    scorer._count_attempt(["q9"])  # another block counts on its own
    with pytest.raises(Rank1Error, match="block of 3 pairs from query 'q7' was started 5 times"):
        scorer._count_attempt(["q7", "q7", "q8"])

