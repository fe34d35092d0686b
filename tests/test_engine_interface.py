"""The one engine interface (``model.engine``): cancelled work really gone, admission first and atomic, and a model
whose loading fails at any step leaves nothing behind (quick tier: a real ``Rank1`` — owner thread, pipeline,
cache writer — over the scripted engine; no model, no torch)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from fake_engine import RecordingEngine, scripted, scripted_rank1

from rank1_local.core.config import ScoringConfig
from rank1_local.core.engine import Lifecycle
from rank1_local.core.errors import Rank1Error
from rank1_local.pipeline import Overloaded, Stopped

pytestmark = pytest.mark.quick

SCRIPTS = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic.</think>",
           "slow": "\n" + "thinking, " * 30 + "done.</think>"}
CONFIG = ScoringConfig(max_think_tokens=512, n_ctx=2048)


def paused(engine):
    """Hold the owner thread at its next decode until the returned event is set."""
    go = threading.Event()
    decode = engine.decode
    engine.decode = lambda entries: (go.wait(30), decode(entries))[1]
    return go


def settled(model, timeout=10.0):
    """Wait until nothing is left anywhere: no ticket in the pipeline or the owner, nothing waiting or queued, every
    slot free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = model.engine.stats()
        if (stats.open_requests, model._owner.open_tickets, stats.waiting, model._owner.queue.depth,
                stats.active_slots) == (0, 0, 0, 0, 0):
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def make_model():
    made = []

    def make(parallel=2, engine=None, **kw):
        model = scripted_rank1(engine or RecordingEngine(scripted(SCRIPTS)), parallel, CONFIG, **kw)
        made.append(model)
        return model

    yield make
    for model in made:
        model.close()


# --- cancelled work is gone --------------------------------------------------------------------------------------

def test_cancelled_tickets_leave_the_owner_and_the_queue_at_once(make_model):
    """parallel 1, max_waiting 10, one slot busy: 8 pairs submitted and cancelled no longer count as waiting."""
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=1, engine=engine, max_waiting=10)
    go = paused(engine)
    try:
        busy = model.engine.submit([("What about the slow apple?", "slow doc 0")])
        deadline = time.monotonic() + 10
        while model.waiting and time.monotonic() < deadline:  # the owner takes it into the one slot
            time.sleep(0.005)
        cancelled = model.engine.submit([("What about the slow apple?", f"slow doc {i}") for i in range(1, 9)])
        assert model.waiting == 8
        assert cancelled.cancel() == 8
        assert model.waiting == 0 and model._owner.open_tickets == 1 and model.engine.open_tickets == 1
        later = model.engine.submit([("Is the anchor relevant?", f"doc {i} relevant") for i in range(5)])  # admitted
    finally:
        go.set()
    assert len(list(later.results())) == 5 and len(list(busy.results())) == 1
    assert settled(model)


def test_a_thousand_callers_going_away_leave_nothing_behind(make_model):
    """1,000 requests whose callers go away — before their pairs start, mid-request after a first result, or by
    leaving their results unread — leave 0 tickets, 0 waiting pairs and free slots, and the next request is
    admitted and scored."""
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=4, engine=engine, max_waiting=64)
    rejected = 0
    for i in range(1000):
        pairs = [(f"Question {i}?", f"{'slow' if k else 'off'} doc {i} {k}") for k in range(3)]
        try:
            ticket = model.engine.submit(pairs)
        except Overloaded:  # the queue is full of requests whose slots have not freed yet
            rejected += 1
            continue
        if i % 10 == 0:
            for _ in ticket.results():  # gone after its first result: leaving the loop cancels the rest
                break
        else:
            ticket.cancel()  # gone while its pairs wait or run
    assert settled(model, timeout=60)
    counters = model.engine.counters.snapshot()
    assert counters["requests"] == 1000 - rejected and rejected < 1000
    assert counters["cancelled_requests"] + counters["requests_done"] == counters["requests"]
    assert all(not toks for seq, toks in engine.seqs.items() if seq != 0)  # no cancelled pair kept KV cells
    (result,) = model.score_pairs([("Is the anchor relevant?", "a relevant doc")])
    assert result.score > 0.5


def test_server_clients_going_away_leave_nothing_behind(make_model):
    """The same through the HTTP app: 200 requests whose client tasks are cancelled mid-request (as a client that
    disconnects), then one that completes."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from rank1_local.server.app import ServerSettings, create_app

    model = make_model(parallel=2, max_waiting=4096)
    app = create_app(model, ServerSettings(model_name="scripted"))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            tasks = [asyncio.create_task(client.post("/v1/rerank", json={
                "query": f"Question {i}?", "documents": [f"slow doc {i} {k}" for k in range(3)]})) for i in range(200)]
            await asyncio.sleep(0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(500):
                if model.engine.open_tickets == 0:
                    break
                await asyncio.sleep(0.02)
            return await client.post("/v1/rerank", json={"query": "q?", "documents": ["a relevant doc"]})

    last = asyncio.run(scenario())
    assert last.status_code == 200
    assert settled(model, timeout=30)


# --- admission: first and atomic ---------------------------------------------------------------------------------

def test_admission_is_atomic_and_comes_before_tokenizing(make_model):
    """16 threads submit 5 pairs each at once against a limit of 10 while the owner is held: exactly two are
    admitted (never more), and a refused request was never tokenized."""
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=1, engine=engine, max_waiting=10)
    go = paused(engine)
    model.engine.submit([("Warm?", "slow doc warm")])  # holds the one slot, never waits
    deadline = time.monotonic() + 10
    while model.waiting and time.monotonic() < deadline:
        time.sleep(0.005)
    tokenized = []
    tokenize = model.engine.tokenizer.tokenize

    class Counting:
        def tokenize(self, text):
            tokenized.append(text)
            time.sleep(0.001)  # a slow tokenizer widens any race
            return tokenize(text)

        def detokenize(self, ids):
            return model.tokenizer.detokenize(ids)

    model.engine.tokenizer = Counting()
    start = threading.Barrier(16)
    admitted, refused = [], []

    def call(t):
        pairs = [(f"Thread {t} asks?", f"slow doc {t} {k}") for k in range(5)]
        start.wait()
        try:
            admitted.append(model.engine.submit(pairs))
        except Overloaded:
            refused.append(t)

    threads = [threading.Thread(target=call, args=(t,)) for t in range(16)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        go.set()
    assert len(admitted) == 2 and len(refused) == 14
    assert not any(f"Thread {t} asks?" in text for t in refused for text in tokenized)
    for ticket in admitted:
        assert len(list(ticket.results())) == 5
    assert settled(model)


def test_queue_and_decode_times_are_measured(make_model):
    model = make_model(parallel=1)
    model.score_pairs([("What about the slow apple?", f"slow doc {i}") for i in range(4)])
    stats = model.engine.stats()
    assert stats.queue_seconds.count == 4 and stats.decode_seconds.count == 4
    assert stats.decode_seconds.total > 0 and stats.backend == "llama.cpp"
    assert stats.queue_seconds.counts == tuple(sorted(stats.queue_seconds.counts))  # cumulative buckets


# --- one lifecycle -------------------------------------------------------------------------------------------------

class Recorder:
    """What was opened and closed, and in which order."""

    def __init__(self):
        self.events = []


STEPS = ("cache", "tokenizer", "answers", "engine", "scheduler", "pipeline")


@pytest.mark.parametrize("failing", STEPS)
def test_a_load_that_fails_at_any_step_frees_what_it_made(failing, tmp_path, monkeypatch):
    """Fail each step of loading in turn: the constructor raises (never hangs), no owner thread is left, and whatever
    was opened is closed, in reverse order."""
    import rank1_local.backends.llama.facade as facade
    from rank1_local import LlamaSettings, Rank1
    from rank1_local.backends.llama import owner as owner_module
    from rank1_local.cache.store import JudgmentCache

    events = []
    threads_before = {t.ident for t in threading.enumerate()}

    class Boom(Rank1Error):
        pass

    class TrackedEngine(RecordingEngine):
        def close(self):
            events.append("engine closed")
            super().close()

    engine = TrackedEngine(scripted(SCRIPTS))

    class Tokenizer:
        def __init__(self):
            if failing == "tokenizer":
                raise Boom("tokenizer")
            events.append("tokenizer opened")

        def tokenize(self, text):
            if failing == "answers":
                return [1, 2, 3]  # no single-token answers: not a rank1 model
            return engine.tokenize(text)

        def detokenize(self, ids):
            return engine.detokenize(ids)

        def close(self):
            events.append("tokenizer closed")

    class Cache(JudgmentCache):
        def __init__(self, path):
            if failing == "cache":
                raise Boom("cache")
            super().__init__(path)
            events.append("cache opened")

        def close(self):
            events.append("cache closed")
            super().close()

    def open_engine():
        if failing == "engine":
            raise Boom("engine")
        events.append("engine opened")
        return engine

    if failing == "scheduler":
        def broken(self, resource):
            raise Boom("scheduler")
        monkeypatch.setattr(owner_module.EngineOwner, "_prepare", broken)
    if failing == "pipeline":
        def broken_pipeline(*args, **kwargs):
            raise Boom("pipeline")
        monkeypatch.setattr(facade, "Pipeline", broken_pipeline)
    monkeypatch.setattr(facade, "JudgmentCache", Cache)

    class Loading(Rank1):
        def __init__(self):
            self._start(CONFIG, LlamaSettings(parallel=2), Path("scripted.gguf"), Tokenizer, open_engine,
                        tmp_path / "c.sqlite3")

    started = time.monotonic()
    with pytest.raises(Rank1Error):
        Loading()
    assert time.monotonic() - started < 10
    opened = [e.removesuffix(" opened") for e in events if e.endswith("opened")]
    closed = [e.removesuffix(" closed") for e in events if e.endswith("closed")]
    assert sorted(opened) == sorted(set(closed)), events  # everything opened was closed
    order = [e for e in events if e.endswith("closed")]
    if "engine closed" in order and "tokenizer closed" in order:
        assert order.index("engine closed") < order.index("tokenizer closed")  # reverse order of opening
    if "cache closed" in order and "tokenizer closed" in order:
        assert order.index("tokenizer closed") < order.index("cache closed")
    deadline = time.monotonic() + 5
    while {t.ident for t in threading.enumerate() if t.name == "rank1-llama"} - threads_before:
        assert time.monotonic() < deadline, "an owner thread was left running"
        time.sleep(0.01)


def test_close_is_one_path_through_the_states(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(engine=engine)
    assert model.lifecycle is Lifecycle.OPEN and model.engine.state is Lifecycle.OPEN
    go = paused(engine)
    ticket = model.engine.submit([("What about the slow apple?", "slow doc")])
    closer = threading.Thread(target=model.close)
    closer.start()
    go.set()
    closer.join(10)
    assert model.lifecycle is Lifecycle.CLOSED and model.engine.state is Lifecycle.CLOSED
    with pytest.raises(Stopped):
        list(ticket.results())
    assert engine.closed and not model._owner._thread.is_alive()
