"""`rank1-bench study` as an operating-point map on the behaving fixture: ``--budgets 8,16,32,64`` (one generation, the
smaller budgets derived), killed mid-sweep and resumed; ``--target-latency``; and ``--prefilter`` with ``--keep 4`` (the
prefilter: the qwen3-reranker-behaving fixture's F16 GGUF, a prefill reranker that answers at once). Fixture numbers
test the machinery, not rank1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_study import ROOT, env, write_pairs

BUDGETS = "8,16,32,64"
TARGET = "1000"  # seconds per query: every point meets it, so the best is the best nDCG@10


@pytest.fixture(scope="module")
def swept(fixture_dir, tmp_path_factory):
    """The sweep of Q8_0 on 4 queries (32 pairs), killed while its budget sweep's run is half written, then run
    again: (command, folder, rows the killed session left, the reference run's bytes before the restart)."""
    from rank1_local.runs.inputs import done_keys

    pytest.importorskip("scipy")
    tmp = tmp_path_factory.mktemp("sweep")
    pairs, qrels = write_pairs(tmp / "in", 4)
    cmd = [sys.executable, "-m", "benchmarks.cli", "-q", "study", "--model", str(fixture_dir("behaving")), "--types",
           "Q8_0", "--pairs", str(pairs), "--qrels", str(qrels), "--reference", "transformers", "--budgets", BUDGETS,
           "--n-ctx", "512", "--threads", "2", "--parallel", "1", "--target-latency", TARGET, "--work",
           str(tmp / "work"), "--out", str(tmp / "out")]
    run_file = tmp / "work" / "runs" / "Q8_0.jsonl"
    log = tmp / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True, stderr=err)
    try:
        deadline = time.monotonic() + 1200
        while not (run_file.exists() and len(run_file.read_text().splitlines()) >= 5):
            assert proc.poll() is None, f"the study ended before it could be killed: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its scoring process, mid-sweep
    finally:
        proc.wait()
    before = len(done_keys(run_file))
    reference = {p: p.read_bytes() for p in (tmp / "work" / "runs").glob("reference-*.jsonl")}
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, stderr=subprocess.DEVNULL)
    return cmd, tmp, before, reference


def test_a_killed_sweep_resumes_without_scoring_anything_twice(swept):
    """Every pair once in the sweep's run, each row with its cuts; the restart scored only the pairs the kill left;
    the reference was not run again; the calibration run (budget 8, scored directly) was scored once, after."""
    from rank1_local.runs.run_header import header_path, read_header

    _, tmp, before, reference = swept
    runs = tmp / "work" / "runs"
    assert 5 <= before < 32
    rows = [json.loads(line) for line in (runs / "Q8_0.jsonl").read_text().splitlines()]
    assert len(rows) == len({(r["qid"], r["docid"]) for r in rows}) == 32
    assert all(isinstance(r["cuts"], list) and r["n_prompt_tokens"] > 0 for r in rows)
    assert read_header(header_path(runs / "Q8_0.jsonl")).pairs == 32
    assert reference == {p: p.read_bytes() for p in runs.glob("reference-*.jsonl")}
    sessions = json.loads((runs / "Q8_0.job.json").read_text())["sessions"]  # the killed one recorded none
    assert [s["pairs"] for s in sessions] == [32 - before]
    calibration = [json.loads(line) for line in (runs / "Q8_0@8.jsonl").read_text().splitlines()]
    assert len(calibration) == 32 and all(r["n_tokens"] <= 8 for r in calibration)


def test_the_sweep_reports_each_budget_the_frontier_and_the_target(swept):
    """Four points (one measured: budget 8, scored directly; three derived from token counts), the derivation equal to
    the direct run at 8, a frontier, the best point for the target and the plot."""
    _, tmp, _, _ = swept
    report = json.loads((tmp / "out" / "study.json").read_text())
    points = report["points"]["points"]
    assert [(p["type"], p["budget"], p["keep"]) for p in points] == [("Q8_0", b, None) for b in (8, 16, 32, 64)]
    assert [p["timing"] for p in points] == ["measured", "derived", "derived", "derived"]
    assert all(p["seconds_per_query"] > 0 and p["peak_rss_bytes"] > 0 and p["ndcg10"]["value"] > 0 for p in points)
    assert points[0]["seconds_per_query"] < points[-1]["seconds_per_query"]  # 8 tokens cost less than 64
    (check,) = report["points"]["checks"]
    assert check["budget"] == 8 and check["same_text"] == check["pairs"] == 32 and check["max_abs_diff"] <= 1e-3
    (q8,) = report["types"]
    assert points[-1]["flip_count"] == q8["flip_count"]  # the largest budget is the type's own run
    assert any(p["frontier"] for p in points)
    target = report["points"]["target"]
    best = max(points, key=lambda p: (p["ndcg10"]["value"], -p["seconds_per_query"]))
    assert target["seconds"] == float(TARGET) and target["best"].startswith(f"Q8_0 · {best['budget']} tokens")
    markdown = (tmp / "out" / "study.md").read_text()
    assert "## Operating points" in markdown and f"**Target {TARGET} s per query**: the best point is" in markdown
    assert (tmp / "out" / "study.png").stat().st_size > 30_000
    from benchmarks.study.report import render_markdown, report_from_json

    assert render_markdown(report_from_json(report)) == markdown  # study.json holds all of it (--html-only)


def test_a_prefilter_adds_the_cascade_points_and_scores_nothing_else_again(swept, exported, tmp_path):
    """The same study with ``--prefilter P.gguf --keep 4``: only the prefilter is scored (every run of the sweep
    is kept as it was), and each budget gets a cascade point: rank1 judged 4 documents per query, its time the
    prefilter's measured time plus rank1's derived time over the kept pairs, its memory both models'. It runs in the
    sweep's own work folder (run files name their model by path: a copied folder is another study), so it comes last;
    its report goes elsewhere."""
    cmd, tmp, _, _ = swept
    work = tmp / "work"
    runs = {p: p.read_bytes() for p in (work / "runs").glob("*.jsonl")}
    swap = {str(tmp / "out"): str(tmp_path / "out")}
    prefilter = exported("qwen3-reranker-behaving", "F16")
    done = subprocess.run([swap.get(a, a) for a in cmd] + ["--prefilter", str(prefilter), "--keep", "4"], env=env(),
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert runs == {p: p.read_bytes() for p in runs}
    first = [json.loads(line) for line in (work / "runs" / "prefilter.jsonl").read_text().splitlines()]
    assert len(first) == 32 and all(r["n_tokens"] == 0 and r["reasoning"] == "" for r in first)  # prefill: no decoding
    report = json.loads((tmp_path / "out" / "study.json").read_text())["points"]
    plain = {p["budget"]: p for p in report["points"] if p["keep"] is None}
    cascade = {p["budget"]: p for p in report["points"] if p["keep"] == 4}
    assert sorted(cascade) == [8, 16, 32, 64]
    for budget, p in cascade.items():
        assert p["judged"] == 16 and p["timing"] == "derived"
        assert p["seconds_per_query"] > report["prefilter_seconds"] / 4  # the prefilter's time is in it
        assert p["peak_rss_bytes"] == plain[budget]["peak_rss_bytes"] + report["prefilter_peak_rss_bytes"]
