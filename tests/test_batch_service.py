"""The server's continuous batch across requests (round-robin fairness, one batch for all, cancellation,
shutdown) on the scripted engine: quick tier, no model, no torch. The HTTP layer on a real GGUF is in
tests/test_server.py."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_engine import FALSE, TRUE, FakeEngine, RecordingEngine, scripted

from rank1_local.backends.llama.scheduler import Scheduler, SchedulerParams, make_jobs
from rank1_local.backends.llama.service import BatchService, RoundRobinQueue, ServiceStopped, Ticket
from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import prepare_pairs
from rank1_local.core.prompt import prompt_prefix

pytestmark = pytest.mark.quick

SCRIPTS = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic.</think>",
           "slow": "\n" + "thinking, " * 30 + "done.</think>"}
CONFIG = ScoringConfig(max_think_tokens=512, n_ctx=2048)


@dataclass
class ScriptedModel:
    """The parts of :class:`Rank1` the service uses, over the scripted engine."""

    engine: FakeEngine
    parallel: int
    config: ScoringConfig = CONFIG
    true_id: int = TRUE
    false_id: int = FALSE
    model_path: Path = Path("scripted.gguf")
    backend: str = "scripted"
    settings: object = field(init=False)

    def __post_init__(self) -> None:
        self.settings = type("S", (), {"parallel": self.parallel})()

    def with_config(self, config):
        return self

    def cache_scope(self):
        return None


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


def service_for(parallel: int, engine=None) -> BatchService:
    return BatchService(ScriptedModel(engine or RecordingEngine(scripted(SCRIPTS)), parallel))


def submit(service, pairs, config=None):
    c = Collector()
    ticket = service.submit(pairs, config, c.on_result, c.on_error)
    c.expected = ticket.size
    return ticket, c


def direct(pairs, parallel=2, config=CONFIG):
    engine = FakeEngine(scripted(SCRIPTS))
    prepared = prepare_pairs(pairs, config, engine.tokenize, engine.detokenize)
    results, _ = Scheduler(engine, SchedulerParams(parallel, config, TRUE, FALSE)).run(
        make_jobs(prepared, engine.tokenize))
    return results


def key(r):
    return (r.index, r.score, r.reasoning, r.n_tokens, r.forced)


def test_round_robin_queue_takes_one_job_per_request_in_turn():
    queue = RoundRobinQueue()
    big, small = Ticket(1, 5, print, print), Ticket(2, 2, print, print)
    queue.add(big, ["b0", "b1", "b2", "b3", "b4"])
    queue.add(small, ["s0", "s1"])
    taken = [queue.next_job(block=False) for _ in range(7)]
    assert taken == ["b0", "s0", "b1", "s1", "b2", "b3", "b4"]
    assert queue.next_job(block=False) is None
    queue.add(big, ["x"])
    assert queue.drop(big) == 1 and queue.depth == 0
    queue.close()
    assert queue.next_job(block=True) is None  # closed and empty: no wait
    with pytest.raises(ServiceStopped):
        queue.add(small, ["late"])


def test_a_small_request_is_not_starved_by_a_big_one():
    service = service_for(parallel=2)
    order = []
    big = [("What about the slow apple?", f"slow doc {i}") for i in range(40)]
    small = [("Is the anchor relevant?", "a relevant doc"), ("Is the anchor relevant?", "an off doc")]
    t_big, c_big = submit(service, big)
    t_small, c_small = submit(service, small)
    c_big.hook = lambda r: order.append("big")
    c_small.hook = lambda r: order.append("small")
    service.start()
    assert c_small.done.wait(10) and c_big.done.wait(30)
    assert order.index("small") < 4 and len([o for o in order[:4] if o == "small"]) == 2, order
    assert sorted(map(key, c_small.results)) == sorted(map(key, direct(small)))
    assert sorted(map(key, c_big.results)) == sorted(map(key, direct(big)))
    service.stop(1.0)


def test_concurrent_requests_share_one_batch():
    engine = RecordingEngine(scripted(SCRIPTS))
    service = service_for(parallel=8, engine=engine)
    requests = [[(f"Query number {i}?", f"slow doc {i}a"), (f"Query number {i}?", f"slow doc {i}b")]
                for i in range(8)]
    collectors = [submit(service, pairs)[1] for pairs in requests]
    service.start()
    for pairs, c in zip(requests, collectors, strict=True):
        assert c.done.wait(30)
        assert sorted(map(key, c.results)) == sorted(map(key, direct(pairs)))
    assert max(len(s) for s in engine.seqs_per_call) == 8  # eight clients' pairs decoded in one call
    # round-robin interleaves the queries, yet sequence 0 is loaded once (the first query's prefix); other queries
    # evaluate their part of the prefix in their own slot, within the shared batch
    first_prefix = engine.tokenize(prompt_prefix(requests[0][0][0]))[:-1]
    assert sum(1 for s in engine.seqs_per_call if s == {0}) == math.ceil(len(first_prefix) / engine.n_batch)
    service.stop(1.0)


def test_a_request_repeating_a_document_has_it_judged_once():
    service = service_for(parallel=2)
    unique = [("What about the slow apple?", "slow doc"), ("What about the slow apple?", "a relevant doc")]
    pairs = [unique[0], unique[1], unique[0], unique[0], unique[1]]
    ticket, c = submit(service, pairs)
    service.start()
    assert c.done.wait(10) and ticket.size == 5
    assert sorted(r.index for r in c.results) == list(range(5))
    expected = direct(unique)
    by_index = {r.index: r for r in c.results}
    for i, pair in enumerate(pairs):
        assert key(by_index[i])[1:] == key(expected[unique.index(pair)])[1:]
    assert service.counters.pairs == 5
    assert service.counters.generated_tokens == sum(r.n_tokens for r in expected)  # two generations, not five
    service.stop(1.0)


def test_cancelling_drops_waiting_pairs_and_frees_slots():
    engine = RecordingEngine(scripted(SCRIPTS))
    service = service_for(parallel=2, engine=engine)
    pairs = [("What about the slow apple?", f"slow doc {i}") for i in range(20)]
    ticket, c = submit(service, pairs)
    first = threading.Event()

    def on_first(result):
        if not c.results:
            service.cancel(ticket)  # from the worker thread, as the server's handler would from another
            first.set()

    c.hook = on_first
    service.start()
    assert first.wait(10)
    later, c2 = submit(service, [("Is the anchor relevant?", "a relevant doc")])
    assert c2.done.wait(10)
    assert len(c.results) == 1 and ticket.cancelled
    assert service.counters.cancelled_pairs == 19
    assert service.counters.cancelled_requests == 1
    # every slot's sequence was emptied: no cancelled pair kept its KV cells
    assert all(not toks for seq, toks in engine.seqs.items() if seq != 0)
    assert service.active_slots == 0 and service.queue_depth == 0
    service.stop(1.0)


def test_per_request_protocol_settings():
    service = service_for(parallel=2)
    pairs = [("What about the slow apple?", "slow doc")]
    tight = ScoringConfig(max_think_tokens=8, n_ctx=2048)
    _, c = submit(service, pairs, tight)
    _, c_default = submit(service, pairs)
    service.start()
    assert c.done.wait(10) and c_default.done.wait(10)
    assert c.results[0].forced and not c_default.results[0].forced
    assert key(c.results[0]) == key(direct(pairs, config=tight)[0])
    with pytest.raises(Exception, match="n_ctx"):
        service.submit(pairs, ScoringConfig(max_think_tokens=8, n_ctx=1024), print, print)
    service.stop(1.0)


def test_shutdown_finishes_what_it_can_then_cancels_and_says_which():
    service = service_for(parallel=1)
    quick_pairs = [("Is the anchor relevant?", "a relevant doc")]
    _, c_quick = submit(service, quick_pairs)
    t_slow, c_slow = submit(service, [("What about the slow apple?", f"slow doc {i}") for i in range(500)])
    service.start()
    assert c_quick.done.wait(10)
    report = service.stop(0.0)
    assert report.in_flight == 1 and report.cancelled_requests == 1 and report.finished_requests == 0
    assert 0 < report.cancelled_pairs <= 500 and t_slow.cancelled
    with pytest.raises(ServiceStopped):
        service.submit(quick_pairs, None, print, print)


def test_an_engine_failure_fails_the_requests_in_flight_and_the_service_goes_on():
    class Flaky(RecordingEngine):
        fail_next = True

        def decode(self, entries):
            if self.fail_next and len(entries) == 1:
                self.fail_next = False
                raise RuntimeError("llama_decode returned 1")
            return super().decode(entries)

    service = service_for(parallel=1, engine=Flaky(scripted(SCRIPTS)))
    _, c = submit(service, [("Is the anchor relevant?", "a relevant doc")])
    service.start()
    assert c.done.wait(10) and c.errors and "llama_decode" in str(c.errors[0])
    _, c2 = submit(service, [("Is the anchor relevant?", "an off doc")])
    assert c2.done.wait(10) and not c2.errors and len(c2.results) == 1
    assert service.counters.errors == 1
    service.stop(1.0)
