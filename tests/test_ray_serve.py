"""``rank1-local serve --ray`` with 2 replicas (1 thread each) on a local Ray cluster, driven by httpx: answers equal
the library's, streaming, auth and limits as ``rank1-local serve``, and the service outlives a killed replica.
``python -m pytest -q -m ray tests``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import engine
from ray_support import BUDGET, N_CTX, PARALLEL, processes

from quantize.fixtures.synthetic_task import all_words, make_pair

pytestmark = pytest.mark.ray

KEY = "ray-test-key"
REPLICA_TITLE = "ServeReplica:rank1-local:Rank1Replica"
TOLERANCE = 1e-3
WORDS = all_words()


def _request(i: int) -> tuple[str, list[str]]:
    query_word = WORDS[(i * 5) % len(WORDS)]
    return make_pair(query_word, query_word).query, [make_pair(query_word, WORDS[(i + 7 * k) % len(WORDS)]).passage
                                                      for k in range(3)]


@pytest.fixture(scope="module")
def model_file(exported):
    return exported("behaving", "Q8_0")


@pytest.fixture(scope="module")
def service(ray_cluster, model_file, tmp_path_factory):
    """``rank1-local serve --ray ADDRESS --replicas 2`` in its own process, on the test session's cluster."""
    httpx = pytest.importorskip("httpx")
    from benchmarks.server_process import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    cmd = [sys.executable, "-m", "rank1_local.cli.main", "serve", "--model", str(model_file), "--port", str(port),
           "--api-key", KEY, "--n-ctx", str(N_CTX), "--max-think-tokens", str(BUDGET), "--parallel", str(PARALLEL),
           "--threads", "1", "--max-documents", "12", "--ray", ray_cluster, "--replicas", "2", "--name", "rank1-ray",
           "--shutdown-timeout", "5"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200 and "serving on Ray" in log.read_text():
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def direct(model_file):
    from rank1_local import Rank1

    with Rank1(model_file, n_ctx=N_CTX, max_think_tokens=BUDGET, parallel=PARALLEL, threads=1) as model:
        yield lambda query, docs: model.score_pairs([(query, d) for d in docs])


def _post(url, body, **kw):
    import httpx

    return httpx.post(url + "/v1/rerank", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, **kw)


def test_concurrent_requests_get_the_library_results_from_both_replicas(service, direct):
    requests = [_request(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: _post(service, {"query": r[0], "documents": r[1],
                                                          "return_reasoning": True}), requests))
    replicas = set()
    for (query, docs), answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        replicas.add(answer.headers["x-rank1-replica"])
        body = answer.json()
        assert body["model"] == "rank1-ray"
        expected = direct(query, docs)
        assert sorted(row["index"] for row in body["results"]) == list(range(len(docs)))
        for row in body["results"]:
            assert abs(row["relevance_score"] - expected[row["index"]].score) <= TOLERANCE
            assert row["reasoning"] == expected[row["index"]].reasoning
    assert len(replicas) == 2, "Serve's router used both replicas"


def test_streaming_auth_and_limits_are_the_servers(service, direct):
    import httpx

    query, docs = _request(3)
    expected = direct(query, docs)
    with httpx.stream("POST", service + "/v1/rerank", json={"query": query, "documents": docs, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, event = [], None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    assert [kind for kind, _ in events] == ["result"] * len(docs) + ["done"]
    for _, row in events[:-1]:
        assert abs(row["relevance_score"] - expected[row["index"]].score) <= TOLERANCE
        assert row["reasoning"] == expected[row["index"]].reasoning
    assert httpx.post(service + "/v1/rerank", json={"query": query, "documents": docs}, timeout=30).status_code == 401
    too_many = _post(service, {"query": query, "documents": ["d"] * 13})
    assert too_many.status_code == 413 and "13 documents is over the limit of 12" in too_many.json()["message"]
    metrics = httpx.get(service + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert metrics.status_code == 200 and "rank1_pairs_total" in metrics.text and metrics.headers["x-rank1-replica"]


def test_killing_a_replica_does_not_take_the_service_down(service, direct):
    import httpx

    replicas = processes(REPLICA_TITLE)
    assert len(replicas) == 2, replicas
    os.kill(replicas[0], signal.SIGKILL)
    query, docs = _request(5)
    expected = direct(query, docs)
    answered = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the other replica answers while Serve replaces the dead one
        r = _post(service, {"query": query, "documents": docs})
        assert r.status_code == 200, r.text
        for row in r.json()["results"]:
            assert abs(row["relevance_score"] - expected[row["index"]].score) <= TOLERANCE
        answered += 1
    assert answered >= 3
    deadline = time.monotonic() + 120
    while len(set(processes(REPLICA_TITLE)) - {replicas[0]}) < 2:  # and Serve starts a new one
        assert time.monotonic() < deadline, "no replacement replica"
        time.sleep(0.5)
    assert httpx.get(service + "/health", timeout=10).status_code == 200


def test_a_second_server_on_another_port_is_refused_naming_the_running_proxy(service, model_file, capsys):
    from benchmarks.server_process import free_port
    from rank1_local.cli.main import main

    port = service.rsplit(":", 1)[1]
    assert main(["-q", "serve", "--model", str(model_file), "--port", str(free_port()), "--threads", "1", "--ray",
                 "--replicas", "1"]) == 2
    err = capsys.readouterr().err
    assert f"Ray Serve already runs on this cluster with its HTTP proxy on 127.0.0.1:{port}" in err, err


def test_the_deployment_carries_replicas_autoscaling_and_resources(pytestconfig):
    engine(pytestconfig, "ray.serve")
    from rank1_local.integrations.ray_serve import ServeOptions, rank1_deployment

    fixed = rank1_deployment(ServeOptions(replicas=3, threads_per_replica=2, gpus_per_replica=1,
                                          max_ongoing_requests=16, shutdown_timeout=12))
    assert fixed.num_replicas == 3 and fixed.max_ongoing_requests == 16
    assert fixed.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    scaling = rank1_deployment(ServeOptions(replicas=2, max_replicas=6, target_ongoing_requests=3))
    autoscaling = scaling._deployment_config.autoscaling_config  # Serve has no public getter for it
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (2, 6, 3)
    assert fixed._deployment_config.graceful_shutdown_timeout_s == 12
