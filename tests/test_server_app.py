"""The HTTP layer over the one pipeline (quick tier: the real ASGI app and a real Rank1 over the scripted engine, driven
in-process by httpx; no model, no torch): admission answers 503 with Retry-After, counters stay consistent under
concurrent requests, and a request that fails is the only one that fails. The same against a real GGUF and a server
process is in tests/test_server.py."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest
from fake_engine import RecordingEngine, scripted, scripted_rank1

from rank1_local.core.config import ScoringConfig

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from rank1_local.server.app import ServerSettings, create_app  # noqa: E402

pytestmark = pytest.mark.quick

SCRIPTS = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic.</think>",
           "slow": "\n" + "thinking, " * 30 + "done.</think>"}
CONFIG = ScoringConfig(max_think_tokens=512, n_ctx=2048)


@pytest.fixture
def served():
    made = []

    def serve(parallel=2, engine=None, **kw):
        engine = engine or RecordingEngine(scripted(SCRIPTS))
        model = scripted_rank1(engine, parallel, CONFIG, **kw)
        made.append(model)
        app = create_app(model, ServerSettings(model_name="scripted"))
        return model, engine, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    yield serve
    for model in made:
        model.close()


def test_a_full_queue_answers_503_with_retry_after(served):
    model, engine, client = served(parallel=1, max_waiting=6)
    go = threading.Event()
    decode = engine.decode
    engine.decode = lambda entries: (go.wait(10), decode(entries))[1]

    async def scenario():
        async with client:
            first = asyncio.create_task(client.post("/v1/rerank", json={
                "query": "slow?", "documents": [f"slow doc {i}" for i in range(6)]}))
            while model.waiting < 5:  # the first request's pairs wait (one is in the held decode)
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/rerank", json={"query": "q?", "documents": ["a relevant doc"] * 1 +
                                                             ["an off doc", "another relevant doc"]})
            go.set()
            return await first, refused

    first, refused = asyncio.run(scenario())
    assert first.status_code == 200 and len(first.json()["results"]) == 6
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-queue" in refused.json()["message"]


def test_counters_are_consistent_under_concurrent_requests(served):
    model, _, client = served(parallel=4)

    async def scenario():
        async with client:
            replies = await asyncio.gather(*(client.post("/v1/rerank", json={
                "query": f"Question {i}?", "documents": ["a relevant doc", "an off doc", "a relevant doc"]})
                for i in range(12)))
            metrics = (await client.get("/metrics")).text
            return replies, metrics

    replies, metrics = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in replies)
    counters = model.engine.counters.snapshot()
    assert (counters["requests"], counters["requests_done"], counters["pairs"]) == (12, 12, 36)
    assert "rank1_pairs_total 36" in metrics and "rank1_requests_total 12" in metrics
    assert 'rank1_http_responses_total{route="/v1/rerank",status="200"} 12' in metrics


def test_a_failing_request_fails_alone(served):
    """A decode that fails answers its own request 500 and the next request is served."""
    class Flaky(RecordingEngine):
        fail_next = True

        def decode(self, entries):
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("llama_decode returned 1")
            return super().decode(entries)

    model, _, client = served(parallel=2, engine=Flaky(scripted(SCRIPTS)))

    async def scenario():
        async with client:
            bad = await client.post("/v1/rerank", json={"query": "q?", "documents": ["a relevant doc"]})
            good = await client.post("/v1/rerank", json={"query": "q?", "documents": ["an off doc"]})
            return bad, good

    bad, good = asyncio.run(scenario())
    assert bad.status_code == 500 and "llama_decode" in bad.json()["message"]
    assert good.status_code == 200 and model.engine.counters.errors == 1


def test_clients_cannot_write_to_metrics(served):
    """The route label names the server's own routes only (any other path is ``other``), and label values are
    escaped: a path crafted to close the label and add lines is one 404 counted as ``other``."""
    from rank1_local.server.metrics import label_value

    _, _, client = served()
    crafted = "/x%22%7D%201%0Arank1_active_slots%2099%0Arank1_fake%7Ba%3D%22b"

    async def scenario():
        async with client:
            first = await client.get(crafted)
            for i in range(200):
                await client.get(f"/path-{i}")
            return first, (await client.get("/metrics")).text

    first, metrics = asyncio.run(scenario())
    assert first.status_code == 404
    assert "rank1_active_slots 99" not in metrics and "rank1_fake" not in metrics
    assert 'rank1_http_responses_total{route="other",status="404"} 201' in metrics
    assert sum(line.startswith("rank1_http_responses_total") for line in metrics.splitlines()) <= 2
    assert label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_a_request_larger_than_the_queue_is_413_not_503(served):
    _, _, client = served(parallel=1, max_waiting=20)

    async def scenario():
        async with client:
            too_big = await client.post("/v1/rerank", json={"query": "q?", "documents": [
                f"an off doc {i}" for i in range(21)]})
            fits = await client.post("/v1/rerank", json={"query": "q?", "documents": [
                f"an off doc {i}" for i in range(20)]})
            return too_big, fits

    too_big, fits = asyncio.run(scenario())
    assert too_big.status_code == 413 and "retry-after" not in too_big.headers
    assert "could never be admitted" in too_big.json()["message"] and "--max-queue" in too_big.json()["message"]
    assert fits.status_code == 200


@pytest.mark.parametrize("body, field", [({"top_n": "2"}, "top_n"), ({"stream": "yes"}, "stream"),
                                         ({"return_documents": 1}, "return_documents"),
                                         ({"max_think_tokens": 8.0}, "max_think_tokens")])
def test_numbers_and_flags_are_not_guessed_from_strings(served, body, field):
    _, _, client = served()

    async def scenario():
        async with client:
            return await client.post("/v1/rerank", json={"query": "q?", "documents": ["an off doc"], **body})

    reply = asyncio.run(scenario())
    assert reply.status_code == 422 and field in reply.json()["message"]


@pytest.mark.parametrize("key", ["clé", "two words", "tab\tkey", ""])
def test_an_api_key_no_client_can_send_is_refused_at_start(key, capsys):
    from rank1_local.cli.main import main
    from rank1_local.core.errors import Rank1Error
    from rank1_local.integrations.client import Rank1Client

    with pytest.raises(Rank1Error, match="printable ASCII"):
        ServerSettings(model_name="m", api_key=key)
    if key:
        with pytest.raises(Rank1Error, match="printable ASCII"):
            Rank1Client("http://127.0.0.1:9", api_key=key)
        assert main(["serve", "--model", "missing.gguf", "--api-key", key]) == 2
        assert "printable ASCII" in capsys.readouterr().err


def test_the_playground_is_served_at_the_root_and_no_ui_turns_it_off():
    """GET / is the playground (its page, script and style from the package, needing no key even when the API does,
    with a policy that lets it load and connect to nothing but this server), counted under its own route in
    /metrics; with ui=False (--no-ui) the three are 404."""
    from importlib import resources

    static = resources.files("rank1_local.server") / "static"
    pages = {"/": ("index.html", "text/html"), "/playground.js": ("playground.js", "text/javascript"),
             "/playground.css": ("playground.css", "text/css")}
    auth = {"Authorization": "Bearer k"}

    async def scenario(ui):
        model = scripted_rank1(RecordingEngine(scripted(SCRIPTS)), 1, CONFIG)
        app = create_app(model, ServerSettings(model_name="scripted", api_key="k", ui=ui))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                replies = {path: await client.get(path) for path in pages}
                return replies, (await client.get("/metrics", headers=auth)).text
        finally:
            model.close()

    replies, metrics = asyncio.run(scenario(True))
    for path, (name, media_type) in pages.items():
        reply = replies[path]
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(media_type)
        assert reply.content == (static / name).read_bytes()
        assert reply.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
        assert "connect-src 'self'" in reply.headers["content-security-policy"]
        assert reply.headers["x-content-type-options"] == "nosniff"
    assert 'rank1_http_responses_total{route="/",status="200"} 1' in metrics
    assert 'rank1_http_responses_total{route="/playground.js",status="200"} 1' in metrics
    assert not any(re.search(r"https?://|\ssrc=\"//|\shref=\"//", r.text) for r in replies.values())  # nothing outside

    replies, metrics = asyncio.run(scenario(False))
    assert all(reply.status_code == 404 for reply in replies.values())
    assert 'rank1_http_responses_total{route="other",status="404"} 3' in metrics
