"""``rank1-local serve`` on a fixture GGUF, driven by real clients (httpx, the cohere SDK, raw sockets): the
endpoint shapes, auth, limits, streaming, cancellation, metrics and graceful shutdown. Every score is checked
against a direct library call on the same file."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from benchmarks.server_process import ServerProcess  # noqa: E402
from quantize.fixtures.synthetic_task import make_pair  # noqa: E402
from rank1_local import Rank1  # noqa: E402

KEY = "test-key-123"
N_CTX, BUDGET = 512, 64
ARGS = ["--n-ctx", str(N_CTX), "--max-think-tokens", str(BUDGET), "--parallel", "4", "--threads", "2",
        "--max-documents", "12", "--max-chars", "4000", "--max-body-bytes", "20000", "--shutdown-timeout", "20"]
WORDS = ["horse", "lemon", "apple", "cherry", "banana", "tiger"]
QUERY = make_pair("apple", "apple").query
DOCS = [make_pair("apple", w).passage for w in WORDS]


@pytest.fixture(scope="module")
def model_file(exported):
    return exported("behaving", "Q8_0")


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(model_file, ARGS + ["--name", "rank1-fixture"], log, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def direct(model_file):
    """The library's own results for (query, doc) pairs, as the ground truth of every server answer."""
    with Rank1(model_file, n_ctx=N_CTX, max_think_tokens=BUDGET, parallel=4, threads=2) as m:
        cache = {}

        def get(query, docs, **config):
            key = (query, tuple(map(json.dumps, docs)), tuple(sorted(config.items())))
            if key not in cache:
                settings = m.config.__class__(**(m.config.to_dict() | config)) if config else None
                cache[key] = m.score_pairs([(query, d) for d in docs], config=settings)
            return cache[key]

        yield get


def post(server, body, path="/v1/rerank", **kw):
    return httpx.post(server.url + path, json=body, headers=server.headers, timeout=120, **kw)


def check_scores(rows, expected, score_key="relevance_score"):
    for row in rows:
        assert abs(row[score_key] - expected[row["index"]].score) <= 1e-4, (row, expected[row["index"]])


def test_cohere_jina_shape(server, direct):
    expected = direct(QUERY, DOCS)
    r = post(server, {"model": "rank1-fixture", "query": QUERY, "documents": DOCS, "top_n": 3,
                      "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "rank1-fixture" and body["id"]
    rows = body["results"]
    assert len(rows) == 3
    best = sorted(expected, key=lambda x: (-x.score, x.index))[:3]
    assert [row["index"] for row in rows] == [x.index for x in best]
    check_scores(rows, expected)
    assert all(row["document"] == {"text": DOCS[row["index"]]} for row in rows)
    assert "reasoning" not in rows[0]
    assert body["usage"]["prompt_tokens"] == sum(x.n_prompt_tokens for x in expected)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + sum(x.n_tokens for x in expected)


def test_tei_shape_on_rerank(server, direct):
    expected = direct(QUERY, DOCS)
    r = post(server, {"query": QUERY, "texts": DOCS, "return_text": True}, path="/rerank")
    assert r.status_code == 200, r.text
    rows = r.json()
    assert isinstance(rows, list) and len(rows) == len(DOCS)
    assert [row["score"] for row in rows] == sorted((row["score"] for row in rows), reverse=True)
    check_scores(rows, expected, "score")
    assert all(row["text"] == DOCS[row["index"]] for row in rows)


def test_documents_as_objects_with_titles_and_rank1_extras(server, direct):
    docs = [{"text": d, "title": f"Doc {i}"} for i, d in enumerate(DOCS[:3])]
    expected = direct(QUERY, docs)
    r = post(server, {"query": QUERY, "documents": docs, "return_reasoning": True, "return_documents": True})
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    check_scores(rows, expected)
    for row in rows:
        assert row["reasoning"] == expected[row["index"]].reasoning
        assert row["forced"] is expected[row["index"]].forced and row["n_tokens"] == expected[row["index"]].n_tokens
        assert row["document"] == docs[row["index"]]


def test_per_request_protocol_settings(server, direct):
    expected = direct(QUERY, DOCS[:2], max_think_tokens=8)
    r = post(server, {"query": QUERY, "documents": DOCS[:2], "max_think_tokens": 8, "return_reasoning": True})
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert all(row["forced"] for row in rows)
    check_scores(rows, expected)


def test_the_cohere_sdk_talks_to_it(server, direct):
    cohere = pytest.importorskip("cohere")
    expected = direct(QUERY, DOCS)
    v2 = cohere.ClientV2(api_key=KEY, base_url=server.url)
    response = v2.rerank(model="rank1-fixture", query=QUERY, documents=DOCS, top_n=2)
    assert len(response.results) == 2
    best = sorted(expected, key=lambda x: (-x.score, x.index))[:2]
    assert [x.index for x in response.results] == [x.index for x in best]
    assert all(abs(x.relevance_score - expected[x.index].score) <= 1e-4 for x in response.results)
    v1 = cohere.Client(api_key=KEY, base_url=server.url)
    response = v1.rerank(model="rank1-fixture", query=QUERY, documents=DOCS[:3], return_documents=True)
    assert {x.index for x in response.results} == {0, 1, 2}
    assert all(x.document.text == DOCS[x.index] for x in response.results)


def test_auth(server):
    body = {"query": QUERY, "documents": DOCS[:1]}
    no_key = httpx.post(server.url + "/v1/rerank", json=body, timeout=30)
    wrong = httpx.post(server.url + "/v1/rerank", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    for r in (no_key, wrong):
        assert r.status_code == 401 and "API key" in r.json()["message"]
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # health checks need no key
    assert post(server, body).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ({"query": QUERY, "documents": ["d"] * 13}, 413, "13 documents is over the limit of 12"),
    ({"query": QUERY, "documents": ["x" * 3000, "y" * 1000]}, 413, "characters"),
    ({"query": QUERY, "documents": ["x" * 25000]}, 413, "bytes"),
    ({"query": QUERY}, 422, "documents"),
    ({"query": QUERY, "documents": DOCS[:1], "texts": DOCS[:1]}, 422, "one of them"),
    ({"query": "", "documents": DOCS[:1]}, 422, "query"),
    ({"query": QUERY, "documents": []}, 422, "no documents"),
    ({"query": QUERY, "documents": DOCS[:1], "top_n": 0}, 422, "top_n"),
    ({"query": QUERY, "documents": DOCS[:1], "protocol": "fast"}, 422, "protocol"),
    ({"query": QUERY, "documents": DOCS[:1], "max_think_tokens": 100000}, 422, "max_think_tokens"),
    ({"query": QUERY, "documents": DOCS[:1], "dataset": "SciFact", "prompt": "x"}, 422, "not both"),
    ({"query": QUERY, "documents": [{"title": "no text"}]}, 422, "documents.0"),
])
def test_limits_and_bad_requests_are_refused_and_the_server_goes_on(server, body, status, words):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert words in r.json()["message"]
    assert post(server, {"query": QUERY, "documents": DOCS[:1]}).status_code == 200


def test_malformed_json_is_refused(server):
    r = httpx.post(server.url + "/v1/rerank", content=b'{"query": "x", "documents": [', timeout=30,
                   headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code == 422 and "invalid request" in r.json()["message"]


def _events(lines):
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def test_streaming_sends_each_result_as_it_finishes_then_the_whole_answer(server, direct):
    expected = direct(QUERY, DOCS)
    body = {"query": QUERY, "documents": DOCS, "stream": True, "top_n": 2}
    with httpx.stream("POST", server.url + "/v1/rerank", json=body, headers=server.headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(_events(r.iter_lines()))
    kinds = [kind for kind, _ in events]
    assert kinds == ["result"] * len(DOCS) + ["done"]
    rows = [data for kind, data in events if kind == "result"]
    assert sorted(row["index"] for row in rows) == list(range(len(DOCS)))
    check_scores(rows, expected)
    assert all(row["reasoning"] == expected[row["index"]].reasoning for row in rows)
    assert [row["seconds"] for row in rows] == sorted(row["seconds"] for row in rows)  # in finishing order
    done = events[-1][1]
    assert [row["index"] for row in done["results"]] == [x.index for x in
                                                         sorted(expected, key=lambda x: (-x.score, x.index))[:2]]


def _metric(server, name):
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_a_client_that_goes_away_has_its_pairs_cancelled_and_slots_freed(server):
    before = _metric(server, "rank1_cancelled_pairs_total")
    docs = [make_pair("apple", w).passage + f" Copy {i}." for i, w in enumerate(WORDS * 2)]
    body = json.dumps({"query": "What is known about the banana?", "documents": docs, "stream": True,
                       "max_think_tokens": 200}).encode()  # 3 rounds of long judgments: still busy when it goes
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"event: result" in _read_until(sock, b"event: result")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (_metric(server, "rank1_active_slots") == 0 and _metric(server, "rank1_queue_depth") == 0
                and _metric(server, "rank1_open_requests") == 0):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("slots still busy after the client went away")
    assert _metric(server, "rank1_cancelled_pairs_total") > before


def _read_until(sock, marker, timeout=60.0):
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_health_models_and_metrics(server):
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["slots"] == 4
    models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()
    assert models["data"][0]["id"] == "rank1-fixture"
    assert models["data"][0]["meta"]["protocol"]["max_think_tokens"] == BUDGET
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=30).text
    for name in ("rank1_pairs_total", "rank1_generated_tokens_total", "rank1_queue_depth", "rank1_active_slots",
                 "rank1_cache_hits_total", "rank1_pairs_per_second", "rank1_tokens_per_second"):
        assert f"# TYPE {name} " in text
    assert _metric(server, "rank1_pairs_total") > 0
    assert 'rank1_http_responses_total{route="/v1/rerank",status="200"}' in text


def test_the_playground_at_the_root_and_no_ui(server, model_file, tmp_path):
    """`rank1-local serve` answers GET / with the playground (no key needed for the page itself); `--no-ui` turns it
    off (404) and serves the API as before."""
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "rank1-local playground" in page.text and "/playground.js" in page.text
    with ServerProcess(model_file, ARGS + ["--no-ui"], tmp_path / "no-ui.log") as no_ui:
        assert httpx.get(no_ui.url + "/", timeout=30).status_code == 404
        assert httpx.get(no_ui.url + "/playground.js", timeout=30).status_code == 404
        assert httpx.get(no_ui.url + "/v1/models", timeout=30).status_code == 200


# A shutdown test needs its request still running when the signal is handled (uvicorn looks every 0.1 s; CI may be
# slower): one slot and 12 documents of up to 200 thinking tokens keep it running for seconds after the first result.
LONG_REQUEST = {"query": make_pair("grape", "grape").query, "stream": True, "max_think_tokens": 200,
                "documents": [make_pair("grape", w).passage + f" ({i})" for i, w in enumerate(WORDS * 2)]}


def one_slot(shutdown_timeout: float) -> list[str]:
    return ARGS + ["--parallel", "1", "--shutdown-timeout", str(shutdown_timeout)]  # the last flag given wins


def test_graceful_shutdown_finishes_in_flight_requests_and_says_so(model_file, tmp_path):
    with ServerProcess(model_file, one_slot(shutdown_timeout=120), tmp_path / "server.log") as server:
        docs = LONG_REQUEST["documents"]
        with httpx.Client(timeout=180) as client:
            with client.stream("POST", server.url + "/v1/rerank", json=LONG_REQUEST) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("event: "))
                assert first == "event: result"
                server.proc.send_signal(signal.SIGTERM)  # while the request is in flight
                rest = list(_events(lines))
        assert server.proc.wait(150) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert rest[-1][0] == "done" and len(rest[-1][1]["results"]) == len(docs)
        log = server.log()
    assert "shutting down: 1 request in flight" in log
    assert "of 1 request in flight, 1 finished and 0 were cancelled" in log


def test_shutdown_past_its_timeout_cancels_and_says_so(model_file, tmp_path):
    with ServerProcess(model_file, one_slot(shutdown_timeout=0), tmp_path / "server.log") as server:
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", server.url + "/v1/rerank", json=LONG_REQUEST) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("event: ")) == "event: result"
                server.proc.send_signal(signal.SIGTERM)
                rest = list(_events(lines))
        assert server.proc.wait(60) in (0, -signal.SIGTERM)
        log = server.log()
    assert rest[-1][0] == "error" and "shut down before this request finished" in rest[-1][1]["message"]
    assert "of 1 request in flight, 0 finished and 1 was cancelled" in log


def test_the_judgment_cache_serves_repeated_requests(model_file, tmp_path, direct):
    cache = tmp_path / "judgments.sqlite3"
    body = {"query": QUERY, "documents": DOCS[:4], "return_reasoning": True}
    for run in range(2):
        with ServerProcess(model_file, ARGS + ["--cache", str(cache)], tmp_path / f"server{run}.log",
                           api_key=KEY) as server:
            first = post(server, body).json()["results"]
            second = post(server, body).json()["results"]
            hits = _metric(server, "rank1_cache_hits_total")
        assert all(row["cached"] for row in second) and hits == (4 if run == 0 else 8)
        assert all(row["cached"] == (run == 1) for row in first)  # a restarted server finds the rows on disk
        strip = [{k: v for k, v in row.items() if k != "cached"} for row in first]
        assert strip == [{k: v for k, v in row.items() if k != "cached"} for row in second]
    check_scores(second, direct(QUERY, DOCS[:4]))


def test_serve_backend_transformers_answers_the_cohere_sdk(fixture_dir, tmp_path):
    """``serve --backend transformers``: the same server (one engine interface) in front of the transformers backend
    on the fixture's checkpoint; the Cohere SDK's answers are the library's own, and /metrics and /v1/models name the
    backend."""
    cohere = pytest.importorskip("cohere")
    from rank1_local.backends.hf import TransformersRank1

    checkpoint = fixture_dir("behaving")
    with TransformersRank1(checkpoint, n_ctx=N_CTX, max_think_tokens=BUDGET) as m:
        expected = m.score_pairs([(QUERY, d) for d in DOCS])
    args = ["--backend", "transformers", "--n-ctx", str(N_CTX), "--max-think-tokens", str(BUDGET), "--name", "hf"]
    with ServerProcess(checkpoint, args, tmp_path / "server.log", api_key=KEY) as s:
        response = cohere.ClientV2(api_key=KEY, base_url=s.url).rerank(model="hf", query=QUERY, documents=DOCS)
        assert sorted(x.index for x in response.results) == list(range(len(DOCS)))
        assert all(abs(x.relevance_score - expected[x.index].score) <= 1e-6 for x in response.results)
        meta = httpx.get(s.url + "/v1/models", headers=s.headers, timeout=30).json()["data"][0]["meta"]
        assert meta["backend"] == "transformers" and meta["device"].startswith("transformers cpu")
        metrics = httpx.get(s.url + "/metrics", headers=s.headers, timeout=30).text
        assert 'rank1_engine_info{backend="transformers"' in metrics and "rank1_decode_seconds_count 6" in metrics
        bad = httpx.post(s.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, "protocol": "full"},
                         headers=s.headers, timeout=60)
        assert bad.status_code == 200  # transformers runs both protocols
    with pytest.raises(RuntimeError, match="--parallel: not a setting of the transformers backend"):
        ServerProcess(checkpoint, args + ["--parallel", "4"], tmp_path / "refused.log", startup_timeout=60)
