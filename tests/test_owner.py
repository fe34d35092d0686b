"""One owner per llama.cpp context, one pipeline for every caller: concurrent library calls, the server's requests
(round-robin fairness, one batch for all, cancellation, shutdown), closing from any thread, failures isolated to
their own call, admission, and a cache that never stalls decoding. Quick tier: a real :class:`Rank1` (owner thread,
pipeline, cache writer) over the scripted engine; no model, no torch. The same on a real GGUF is in
tests/test_runtime.py and tests/test_server.py."""

from __future__ import annotations

import gc
import math
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_engine import FALSE, TRUE, FakeEngine, RecordingEngine, scripted, scripted_rank1

from rank1_local.backends.llama.scheduler import Scheduler, SchedulerParams, make_jobs
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import prepare_pairs
from rank1_local.core.prompt import prompt_prefix
from rank1_local.pipeline import Overloaded, Stopped
from rank1_local.pipeline.work_queue import WorkQueue

pytestmark = pytest.mark.quick

SCRIPTS = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic.</think>",
           "slow": "\n" + "thinking, " * 30 + "done.</think>"}
CONFIG = ScoringConfig(max_think_tokens=512, n_ctx=2048)


class Collector:
    def __init__(self) -> None:
        self.results = []
        self.errors = []
        self.done = threading.Event()
        self.expected = None
        self.hook = None  # called with each result before it is collected

    def on_result(self, result) -> None:
        if self.hook is not None:
            self.hook(result)
        self.results.append(result)
        if self.expected is not None and len(self.results) >= self.expected:
            self.done.set()

    def on_error(self, exc) -> None:
        self.errors.append(exc)
        self.done.set()


@pytest.fixture
def make_model():
    made = []

    def make(parallel=2, engine=None, **kw):
        model = scripted_rank1(engine or RecordingEngine(scripted(SCRIPTS)), parallel, kw.pop("config", CONFIG), **kw)
        made.append(model)
        return model

    yield make
    for model in made:
        model.close()


def submit(model, pairs, config=None):
    """Submit through the engine interface; a thread of the caller's takes the results as they come."""
    c = Collector()
    ticket = model.engine.submit(pairs, config)
    c.expected = ticket.size

    def take():
        try:
            for result in ticket.results():
                c.on_result(result)
        except BaseException as exc:
            c.on_error(exc)
        c.done.set()

    threading.Thread(target=take, daemon=True).start()
    return ticket, c


def direct(pairs, parallel=2, config=CONFIG):
    engine = FakeEngine(scripted(SCRIPTS))
    prepared = prepare_pairs(pairs, config, engine.tokenize, engine.detokenize)
    results, _ = Scheduler(engine, SchedulerParams(parallel, TRUE, FALSE)).run(
        make_jobs(prepared, engine.tokenize, config))
    return results


def key(r):
    return (r.index, r.score, r.reasoning, r.n_tokens, r.forced)


def paused(engine):
    """Hold the owner thread at its next decode until the returned event is set (so work can pile up)."""
    go = threading.Event()
    decode = engine.decode

    def held(entries):
        go.wait(10)
        return decode(entries)

    engine.decode = held
    return go


# --- the work queue ------------------------------------------------------------------------------------------------

class _T:
    """A ticket as the queue sees it: an id, whether it ended, and how many of its jobs started."""

    def __init__(self, id):
        self.id, self.ended, self.n_started = id, False, 0

    def started(self, n=1):
        self.n_started += n


class _J:
    def __init__(self, owner, name, config="c"):
        self.owner, self.name, self.config = owner, name, config

    def __repr__(self):
        return self.name


def test_work_queue_takes_one_job_per_call_in_turn():
    queue = WorkQueue()
    big, small = _T(1), _T(2)
    queue.add(big, [_J(big, f"b{i}") for i in range(5)])
    assert not queue.interleaved
    queue.add(small, [_J(small, "s0"), _J(small, "s1")])
    assert queue.interleaved and queue.depth == 7
    taken = [repr(queue.next_job(block=False)) for _ in range(7)]
    assert taken == ["b0", "s0", "b1", "s1", "b2", "b3", "b4"]
    assert (big.n_started, small.n_started) == (5, 2)  # taking a job starts it on its ticket
    assert queue.next_job(block=False) is None and queue.depth == 0
    queue.add(big, [_J(big, "x")])
    assert queue.drop(big) == 1 and queue.depth == 0
    queue.close()
    assert queue.next_job(block=True) is None  # closed and empty: no wait
    with pytest.raises(Stopped):
        queue.add(small, [_J(small, "late")])


def test_work_queue_batches_take_calls_in_turn_with_the_same_settings():
    queue = WorkQueue()
    a, b = _T(1), _T(2)
    queue.add(a, [_J(a, "a0"), _J(a, "a1", config="other"), _J(a, "a2")])
    queue.add(b, [_J(b, "b0"), _J(b, "b1")])
    assert [repr(j) for j in queue.next_batch(3, block=False)] == ["a0", "b0", "b1"]
    assert [repr(j) for j in queue.next_batch(10, block=False)] == ["a1"]  # other settings: a batch of its own
    assert [repr(j) for j in queue.next_batch(10, block=False)] == ["a2"]
    assert queue.depth == 0 and (a.n_started, b.n_started) == (3, 2)


# --- many callers, one batch ---------------------------------------------------------------------------------------

def test_threads_calling_one_model_each_get_their_own_results(make_model):
    """8 threads x 5 calls on one model: every call gets exactly its own results, in its own order."""
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=8, engine=engine)
    docs = ["a relevant doc", "an off doc", "a slow doc", "another relevant doc"]

    def calls(t):
        out = []
        for m in range(5):
            pairs = [(f"Thread {t} asks question {m}?", f"{docs[(t + m + k) % 4]} {t}-{m}-{k}") for k in range(3)]
            out.append((pairs, model.score_pairs(pairs)))
        return out

    with ThreadPoolExecutor(8) as pool:
        everything = [c for per_thread in pool.map(calls, range(8)) for c in per_thread]
    for pairs, got in everything:
        assert [r.index for r in got] == [0, 1, 2]
        assert list(map(key, got)) == list(map(key, direct(pairs)))
    assert max(len(s) for s in engine.seqs_per_call) > 4  # several callers' pairs decoded in the same calls
    assert len(engine.threads) == 1  # one thread touched the context: its owner


def test_concurrent_calls_share_one_batch(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=8, engine=engine)
    go = paused(engine)
    requests = [[(f"Query number {i}?", f"slow doc {i}a"), (f"Query number {i}?", f"slow doc {i}b")]
                for i in range(8)]
    collectors = [submit(model, pairs)[1] for pairs in requests]
    go.set()
    for pairs, c in zip(requests, collectors, strict=True):
        assert c.done.wait(30)
        assert sorted(map(key, c.results)) == sorted(map(key, direct(pairs)))
    assert max(len(s) for s in engine.seqs_per_call) == 8  # eight callers' pairs decoded in one call
    # round-robin interleaves the queries, yet sequence 0 is loaded once (the first query's prefix); other queries
    # evaluate their part of the prefix in their own slot, within the shared batch
    first_prefix = engine.tokenize(prompt_prefix(requests[0][0][0]))[:-1]
    assert sum(1 for s in engine.seqs_per_call if s == {0}) == math.ceil(len(first_prefix) / engine.n_batch)
    # 16 pairs of ~40 generated tokens in far fewer decode calls than one call per token
    assert engine.decode_calls < sum(r.n_tokens for c in collectors for r in c.results) / 4


def test_a_small_request_is_not_starved_by_a_big_one(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=2, engine=engine)
    go = paused(engine)
    order = []
    big = [("What about the slow apple?", f"slow doc {i}") for i in range(40)]
    small = [("Is the anchor relevant?", "a relevant doc"), ("Is the anchor relevant?", "an off doc")]
    _, c_big = submit(model, big)
    _, c_small = submit(model, small)
    c_big.hook = lambda r: order.append("big")
    c_small.hook = lambda r: order.append("small")
    go.set()
    assert c_small.done.wait(10) and c_big.done.wait(30)
    assert order.index("small") < 5 and len([o for o in order[:5] if o == "small"]) == 2, order
    assert sorted(map(key, c_small.results)) == sorted(map(key, direct(small)))
    assert sorted(map(key, c_big.results)) == sorted(map(key, direct(big)))


def test_a_request_repeating_a_document_has_it_judged_once(make_model):
    model = make_model(parallel=2)
    unique = [("What about the slow apple?", "slow doc"), ("What about the slow apple?", "a relevant doc")]
    pairs = [unique[0], unique[1], unique[0], unique[0], unique[1]]
    ticket, c = submit(model, pairs)
    assert c.done.wait(10) and ticket.size == 5
    assert sorted(r.index for r in c.results) == list(range(5))
    expected = direct(unique)
    by_index = {r.index: r for r in c.results}
    for i, pair in enumerate(pairs):
        assert key(by_index[i])[1:] == key(expected[unique.index(pair)])[1:]
    assert model.engine.counters.pairs == 5
    assert model.tokens[1] == sum(r.n_tokens for r in expected)  # two generations, not five


def test_per_call_protocol_settings(make_model):
    model = make_model(parallel=2)
    pairs = [("What about the slow apple?", "slow doc")]
    tight = ScoringConfig(max_think_tokens=8, n_ctx=2048)
    (r,) = model.score_pairs(pairs, config=tight)
    (default,) = model.score_pairs(pairs)
    assert r.forced and not default.forced
    assert key(r) == key(direct(pairs, config=tight)[0])
    with pytest.raises(Rank1Error, match="n_ctx is fixed"):
        model.score_pairs(pairs, config=ScoringConfig(max_think_tokens=8, n_ctx=1024))


# --- cancelling, failing, closing ----------------------------------------------------------------------------------

def test_cancelling_drops_waiting_pairs_and_frees_slots(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=2, engine=engine)
    go = paused(engine)
    pairs = [("What about the slow apple?", f"slow doc {i}") for i in range(20)]
    ticket, c = submit(model, pairs)
    first = threading.Event()

    def on_first(result):
        if not c.results:
            ticket.cancel()  # from the caller's side, as the server's handler does
            first.set()

    c.hook = on_first
    go.set()
    assert first.wait(10)
    (later,) = model.score_pairs([("Is the anchor relevant?", "a relevant doc")])
    assert len(c.results) == 1 and ticket.cancelled
    counters = model.engine.counters
    # the pairs its caller never got: those not delivered when it cancelled (results delivered meanwhile, before
    # the cancel, are dropped with the rest)
    assert (counters.cancelled_pairs, counters.cancelled_requests) == (20 - ticket.finished, 1)
    assert ticket.finished < 20
    # every slot's sequence was emptied: no cancelled pair kept its KV cells
    assert all(not toks for seq, toks in engine.seqs.items() if seq != 0)
    assert model.active_slots == 0 and model.waiting == 0


def test_a_failing_callback_fails_only_its_own_request(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=4, engine=engine)
    go = paused(engine)
    bad_pairs = [("What about the slow apple?", f"slow doc {i}") for i in range(6)]
    bad, c_bad = submit(model, bad_pairs)

    def explode(result):
        raise RuntimeError("the event loop is closed")  # e.g. call_soon_threadsafe on a closed loop

    c_bad.hook = explode
    good_pairs = [("Is the anchor relevant?", f"a relevant doc {i}") for i in range(6)]
    _, c_good = submit(model, good_pairs)
    go.set()
    assert c_good.done.wait(10) and c_bad.done.wait(10)
    assert not c_good.errors and sorted(map(key, c_good.results)) == sorted(map(key, direct(good_pairs)))
    assert bad.cancelled and len(c_bad.errors) == 1 and "event loop" in str(c_bad.errors[0])
    assert [r.index for r in model.score_pairs(good_pairs[:2])] == [0, 1]  # and the model goes on


def test_an_engine_failure_fails_the_calls_in_flight_and_the_model_goes_on(make_model):
    class Flaky(RecordingEngine):
        fail_next = True

        def decode(self, entries):
            if self.fail_next and len(entries) == 1:
                self.fail_next = False
                raise RuntimeError("llama_decode returned 1")
            return super().decode(entries)

    model = make_model(parallel=1, engine=Flaky(scripted(SCRIPTS)))
    with pytest.raises(RuntimeError, match="llama_decode"):
        model.score_pairs([("Is the anchor relevant?", "a relevant doc")])
    assert len(model.score_pairs([("Is the anchor relevant?", "an off doc")])) == 1
    assert model.engine.counters.errors == 1


def test_close_from_another_thread_mid_call(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=2, engine=engine)
    pairs = [("What about the slow apple?", f"slow doc {i}") for i in range(200)]
    outcome = []

    def call():
        try:
            outcome.append(model.score_pairs(pairs))
        except Rank1Error as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while engine.decode_calls < 20:
        time.sleep(0.001)
    model.close()  # from this thread, while the caller waits and the owner decodes
    caller.join(10)
    assert not caller.is_alive() and isinstance(outcome[0], Stopped) and "closed" in str(outcome[0])
    assert engine.closed and not model._owner._thread.is_alive()  # freed after the owner stopped
    for call_after in (lambda: model.score_pairs(pairs[:1]), lambda: model.predict([pairs[0]]),
                       lambda: model.rerank("q", ["d"]), lambda: model.rank("q", ["d"]),
                       lambda: model.tokenize("x")):
        with pytest.raises(Rank1Error, match="closed"):
            call_after()
    model.close()  # twice is fine


def test_closing_in_a_with_block_and_by_del(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    with scripted_rank1(engine, 2, CONFIG) as model:
        model.score_pairs([("q?", "a relevant doc")])
        owner = model._owner._thread
    assert engine.closed and not owner.is_alive()

    engine = RecordingEngine(scripted(SCRIPTS))
    model = scripted_rank1(engine, 2, CONFIG)
    model.score_pairs([("q?", "a relevant doc")])
    owner = model._owner._thread
    del model
    gc.collect()
    owner.join(10)
    assert engine.closed and not owner.is_alive()


def test_shutdown_finishes_what_it_can_then_cancels_and_says_which(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=1, engine=engine)
    quick_pairs = [("Is the anchor relevant?", "a relevant doc")]
    _, c_quick = submit(model, quick_pairs)
    assert c_quick.done.wait(10)
    t_slow, c_slow = submit(model, [("What about the slow apple?", f"slow doc {i}") for i in range(500)])
    report = model.engine.stop(0.0, "the server shut down")
    assert report.in_flight == 1 and report.cancelled_requests == 1 and report.finished_requests == 0
    assert 0 < report.cancelled_pairs <= 500 and t_slow.cancelled
    assert c_slow.done.wait(5) and isinstance(c_slow.errors[0], Stopped)
    with pytest.raises(Stopped):
        model.engine.submit(quick_pairs)


def test_admission_limit(make_model):
    engine = RecordingEngine(scripted(SCRIPTS))
    model = make_model(parallel=1, engine=engine, max_waiting=10)
    go = paused(engine)
    submit(model, [("What about the slow apple?", f"slow doc {i}") for i in range(8)])
    with pytest.raises(Overloaded, match="over the limit of 10") as refused:
        submit(model, [("Is the anchor relevant?", f"doc {i}") for i in range(5)])
    assert refused.value.retry_after > 0
    _, c = submit(model, [("Is the anchor relevant?", "a relevant doc")])  # still room for one
    go.set()
    assert c.done.wait(10)


# --- the cache never stalls decoding -------------------------------------------------------------------------------

def test_a_locked_cache_file_does_not_delay_the_decode_steps(tmp_path, make_model, monkeypatch):
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    from rank1_local.cache.store import JudgmentCache

    model_file = tmp_path / "scripted.gguf"
    model_file.write_bytes(b"GGUF scripted")
    path = tmp_path / "c.sqlite3"
    cache = JudgmentCache(path, timeout=5.0)
    engine = RecordingEngine(scripted(SCRIPTS))
    stamps = []
    decode = engine.decode

    def timed(entries):
        stamps.append(time.monotonic())
        return decode(entries)

    engine.decode = timed
    model = make_model(parallel=2, engine=engine, cache=cache, model_path=model_file)
    model.score_pairs([("Warm up?", "a relevant doc")])  # the file exists
    assert cache.flush(5)
    hog = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    hog.execute("BEGIN EXCLUSIVE")  # another process holds the write lock (a VACUUM, say)
    try:
        stamps.clear()
        pairs = [("What about the locked apple?", f"a relevant doc {i}") for i in range(30)]
        started = time.monotonic()
        results = model.score_pairs(pairs)
        took = time.monotonic() - started
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert len(results) == 30 and max(gaps) < 0.2, max(gaps)  # a write would wait 5 s for the lock
        assert took < 3
        assert not cache.flush(0.3)  # the judgments wait in memory …
        assert len(model.score_pairs(pairs[:5]) ) == 5 and model.last_stats.pairs == 0  # … and are served
    finally:
        hog.execute("ROLLBACK")
        hog.close()
    assert cache.flush(5) and cache.stats().rows == 31
