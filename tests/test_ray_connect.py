"""Which Ray cluster `--ray` joins, and how fast it gives up (the ``ray`` tier: Ray is imported, in subprocess drivers
that hold no cluster yet): a web server or a silent port at the address is an error naming the address and where it
came from, within seconds; `--ray` alone never joins a cluster that merely runs on this machine."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ray_support import BUDGET, N_CTX, write_pairs

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def driver(pairs: Path, out: Path, model: str, *ray: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rank1_local.cli.main", "rerank", "--model", model, "--pairs", str(pairs),
               "--output", str(out), "--max-think-tokens", str(BUDGET), "--n-ctx", str(N_CTX), "--parallel", "2",
               "--ray", *ray, "--workers", "1", "--threads-per-worker", "1"]
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=environ)


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, n_queries=2, per_query=2)
    return path


def test_a_web_server_at_the_address_is_named_within_seconds(pairs, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        start = time.monotonic()
        done = driver(pairs, tmp_path / "out.jsonl", "nowhere.gguf", address)
        took = time.monotonic() - start
    finally:
        server.shutdown()
    assert done.returncode == 2 and f"error: {address} (from --ray) is an HTTP server, not a Ray cluster" in done.stderr
    assert took < 30 and "Traceback" not in done.stderr, (took, done.stderr[-2000:])


def test_a_cluster_that_never_lets_us_in_is_given_up_on_after_15_s(pairs, tmp_path):
    """RAY_ADDRESS names a port that takes connections and never answers (as a cluster that refuses our token, retried
    by Ray for 9.5 minutes in the report): an error naming RAY_ADDRESS after 15 s, and the way out."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        start = time.monotonic()
        done = driver(pairs, tmp_path / "out.jsonl", "nowhere.gguf", env={"RAY_ADDRESS": address})
        took = time.monotonic() - start
    finally:
        silent.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: cannot join the Ray cluster at {address} (from RAY_ADDRESS)" in done.stderr
    assert "within 15 s" in done.stderr and "unset RAY_ADDRESS or use --ray local" in done.stderr
    assert 15 <= took < 60 and "Traceback" not in done.stderr, took
    assert not (tmp_path / "out.jsonl").exists()


def test_ray_alone_starts_its_own_cluster_beside_one_running_here(ray_cluster, exported, pairs, tmp_path):
    """Another job's cluster runs on this machine (this test's): `--ray` without RAY_ADDRESS starts a new local
    cluster instead of joining it, and scores."""
    done = driver(pairs, tmp_path / "out.jsonl", str(exported("behaving", "Q8_0")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started a local Ray cluster" in done.stderr and "no RAY_ADDRESS set" in done.stderr
    assert ray_cluster not in done.stderr  # the running cluster's address was never tried
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4
