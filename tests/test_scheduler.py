"""The continuous-batching scheduler and the scoring protocols against a scripted engine (quick tier: no model,
no torch). Each rule of the official protocol has a case here that fails if the rule changes."""

from __future__ import annotations

import math

import pytest
from fake_engine import FALSE, TRUE, FakeEngine, RecordingEngine, scripted

from rank1_local.backends.llama.scheduler import Scheduler, SchedulerParams, make_jobs
from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import prepare_pairs
from rank1_local.core.prompt import build_prompt, prompt_prefix
from rank1_local.core.protocol import common_prefix_len, fallback_prompt, true_false_score

pytestmark = pytest.mark.quick

SCRIPTS = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic, sadly.</think>",
           "long": "\nA long chain: one, two, three, four, five, six. Done.</think>"}
QUERY_A = "What is known about the apple?"
QUERY_B = "What is known about the anchor?"
ANSWER_TOKEN = {"official": 1, "full": 0}  # official counts the answer token among the generated ones


def run(engine, pairs, *, parallel=2, budget=64, rethink=0, cancelled=None, on_result=None, protocol="official",
        n_ctx=512):
    config = ScoringConfig(max_think_tokens=budget, n_ctx=n_ctx, rethink_rounds=rethink, protocol=protocol)
    prepared = prepare_pairs(pairs, config, engine.tokenize, engine.detokenize)
    scheduler = Scheduler(engine, SchedulerParams(parallel, TRUE, FALSE))
    return scheduler.run(make_jobs(prepared, engine.tokenize, config), on_result=on_result, cancelled=cancelled)


def pairs_for(*queries):
    docs = ["a relevant doc", "an off doc", "a long doc", "another relevant doc"]
    return [(q, d) for q in queries for d in docs]


def key(results):
    return [(r.reasoning, r.score, r.n_tokens, r.forced) for r in results]


@pytest.mark.parametrize("protocol", ["official", "full"])
def test_closed_chain_is_scored_at_the_answer(protocol):
    engine = FakeEngine(scripted(SCRIPTS))
    (r,), stats = run(engine, [(QUERY_A, "a relevant doc")], protocol=protocol)
    assert r.reasoning == "\nThe passage is relevant." and not r.forced
    assert r.n_tokens == len(engine.tokenize(SCRIPTS["relevant"])) + ANSWER_TOKEN[protocol]
    assert r.score == pytest.approx(true_false_score(1.0, 0.0))
    assert stats.pairs == 1


@pytest.mark.parametrize("protocol", ["official", "full"])
def test_slots_are_refilled_and_results_keep_input_order(protocol):
    pairs = pairs_for(QUERY_A)[:3] * 3
    pairs = [(q, f"{d} {i}") for i, (q, d) in enumerate(pairs)]
    one, _ = run(FakeEngine(scripted(SCRIPTS)), pairs, parallel=1, protocol=protocol)
    engine = FakeEngine(scripted(SCRIPTS))
    many, _ = run(engine, pairs, parallel=3, protocol=protocol)
    assert [r.index for r in many] == list(range(len(pairs)))
    assert key(many) == key(one)
    assert set(engine.seqs) <= {0, 1, 2, 3}  # the prefix sequence and three slots, never more
    assert engine.decode_calls < sum(r.n_tokens for r in one)  # steps decode several sequences at once


def test_prompts_longer_than_a_batch_are_fed_in_chunks():
    pairs = pairs_for(QUERY_A, QUERY_B)
    wide, _ = run(FakeEngine(scripted(SCRIPTS), n_batch=512), pairs, parallel=4)
    engine = FakeEngine(scripted(SCRIPTS), n_batch=16)
    narrow, _ = run(engine, pairs, parallel=4)
    assert max(engine.batch_sizes) == 16
    assert key(narrow) == key(wide)


def test_prefix_switch_mid_run_evaluates_each_prefix_once():
    engine = FakeEngine(scripted(SCRIPTS))
    pairs = pairs_for(QUERY_A, QUERY_B)
    interleaved = pairs[::2] + pairs[1::2]  # queries alternate: jobs are regrouped by query
    got, stats = run(engine, interleaved, parallel=2)
    seq, _ = run(FakeEngine(scripted(SCRIPTS)), interleaved, parallel=1)
    assert key(got) == key(seq)
    prefixes = [engine.tokenize(prompt_prefix(q))[:-1] for q in (QUERY_A, QUERY_B)]
    shared = common_prefix_len(*prefixes)
    assert 0 < shared < len(prefixes[1])
    expected = len(prefixes[0]) + len(prefixes[1]) - shared
    expected += sum(len(engine.tokenize(build_prompt(q, d))) - len(prefixes[q == QUERY_B]) for q, d in pairs)
    assert stats.prompt_tokens == expected


def test_a_new_querys_prefix_rides_in_the_running_batch():
    """Only the first query's prefix is evaluated alone (nothing runs yet); the next queries' prefixes go into
    sequence 0 inside the batch of the pairs still running, so those never wait for a serial prefix load."""
    queries = [f"What is known about the {w}?" for w in ("apple", "anchor", "amber", "acorn")]
    pairs = pairs_for(*queries)
    engine = RecordingEngine(scripted(SCRIPTS))
    got, stats = run(engine, pairs, parallel=3)
    one, _ = run(FakeEngine(scripted(SCRIPTS)), pairs, parallel=1)
    assert key(got) == key(one)
    first = engine.tokenize(prompt_prefix(queries[0]))[:-1]
    alone = [s for s in engine.seqs_per_call if s == {0}]
    assert len(alone) == math.ceil(len(first) / engine.n_batch)
    assert sum(1 for s in engine.seqs_per_call if 0 in s and len(s) > 1) == len(queries) - 1
    prefixes = [engine.tokenize(prompt_prefix(q))[:-1] for q in queries]
    expected = len(prefixes[0]) + sum(len(b) - common_prefix_len(a, b) for a, b in zip(prefixes, prefixes[1:]))
    expected += sum(len(engine.tokenize(build_prompt(q, d))) - len(prefixes[queries.index(q)]) for q, d in pairs)
    assert stats.prompt_tokens == expected  # each prefix still evaluated once, each passage once


class Recorder:
    """An answer function that records the text the answer was read after."""

    def __init__(self, main=(1.0, 0.0), fallback=(0.3, 0.1)):
        self.main, self.fallback, self.seen = main, fallback, []

    def __call__(self, passage, generated):
        self.seen.append(generated)
        return self.fallback if generated.endswith("\n</think>") and "</think>" not in generated[:-9] \
            and not generated.endswith(".</think>") else self.main


@pytest.mark.parametrize("protocol, forced", [("official", False), ("full", True)])
def test_budget_end_scored_where_generation_stopped_when_both_answers_are_in_the_top_20(protocol, forced):
    """Official: a budget that runs out is scored from the last generated position's top 20 when both answers
    are in it — no fallback. Full: always the fallback."""
    engine = FakeEngine(lambda passage, generated: "x", background=(-5.0, -6.0), answer=Recorder())
    (r,), _ = run(engine, [(QUERY_A, "doc")], budget=25, protocol=protocol)
    assert r.n_tokens == 25 and r.forced is forced
    assert r.score == pytest.approx(true_false_score(-5.0, -6.0) if not forced else true_false_score(0.3, 0.1))


def test_budget_end_without_both_answers_falls_back_with_the_official_cut():
    recorder = Recorder()
    engine = FakeEngine(lambda passage, generated: "x" if len(generated) < 10 else " y.z w", answer=recorder)
    engine.behaviour = lambda passage, generated: ("x" * 10 + " One. two")[len(generated):][:1] or "q"
    (r,), _ = run(engine, [(QUERY_A, "doc")], budget=20)
    assert r.forced and r.n_tokens == 20 and r.reasoning.startswith("xxxxxxxxxx One. two")
    prompt = build_prompt(QUERY_A, "doc")
    # cut after the last sentence end, then stripped: the text starts without its leading space
    assert prompt + recorder.seen[-1] == prompt + "\nxxxxxxxxxx One.\n</think>" == fallback_prompt(prompt, r.reasoning)
    assert r.score == pytest.approx(true_false_score(0.3, 0.1))


def test_reasoning_without_a_sentence_end_is_kept_whole():
    recorder = Recorder()
    engine = FakeEngine(scripted({"doc": "\n  no sentence end here  "}), answer=recorder)
    (r,), _ = run(engine, [(QUERY_A, "doc")])
    assert r.forced
    assert recorder.seen[-1] == "\nno sentence end here\n</think>"


@pytest.mark.parametrize("protocol, n_tokens", [("official", 5), ("full", 4)])
def test_end_of_generation(protocol, n_tokens):
    recorder = Recorder()
    engine = FakeEngine(scripted({"doc": "\nHmm"}), answer=recorder)
    (r,), _ = run(engine, [(QUERY_A, "doc")], protocol=protocol)
    assert r.forced and r.n_tokens == n_tokens and r.reasoning == "\nHmm"
    assert recorder.seen[-1] == "\nHmm\n</think>"
    assert r.score == pytest.approx(true_false_score(0.3, 0.1))


def test_official_goes_on_after_think_close_not_followed_by_an_answer():
    """'</think>' then '\\n': no stop string, so generation goes on until ' true' follows a '</think>'."""
    script = "\nFirst.</think>\nSecond.</think> true"
    answers = {"main": 0}

    def answer(passage, generated):
        answers["main"] += 1
        return (2.0, 1.0) if generated.count("</think>") == 2 else (-30.0, -30.0)  # after the 1st: '\n' wins

    def behaviour(passage, generated):
        return scripted({"": script})(passage, generated)

    engine = FakeEngine(behaviour, answer=answer)
    (r,), _ = run(engine, [(QUERY_A, "doc")])
    assert not r.forced and r.reasoning == "\nFirst."
    assert r.n_tokens == len(engine.tokenize(script))
    assert r.score == pytest.approx(true_false_score(2.0, 1.0))
    (f,), _ = run(FakeEngine(behaviour, answer=answer), [(QUERY_A, "doc")], protocol="full")
    assert f.n_tokens == len(engine.tokenize("\nFirst.</think>")) and f.score == pytest.approx(0.5)


def test_official_answer_outside_the_top_20_goes_to_the_fallback():
    """A confident answer pushes the other one out of the top 20: the official code falls back (never P=0)."""
    recorder = Recorder(main=(5.0, -50.0), fallback=(2.0, 1.0))
    engine = FakeEngine(scripted({"doc": "\nSure.</think>"}), answer=recorder)
    (r,), _ = run(engine, [(QUERY_A, "doc")])
    assert r.forced and r.reasoning == "\nSure."
    # the fallback re-reads the answer after "\nSure.\n</think>" (official text: without the stop string)
    assert recorder.seen[-1] == "\nSure.\n</think>" and r.score == pytest.approx(true_false_score(2.0, 1.0))
    (full,), _ = run(FakeEngine(scripted({"doc": "\nSure.</think>"}), answer=Recorder(main=(5.0, -50.0))),
                     [(QUERY_A, "doc")], protocol="full")
    assert not full.forced and full.score == pytest.approx(1.0)


def test_prompt_longer_than_the_context_scores_half_and_is_flagged():
    engine = FakeEngine(scripted(SCRIPTS))
    long_doc = "a relevant doc " + "filler " * 100
    got, _ = run(engine, [(QUERY_A, long_doc), (QUERY_A, "a relevant doc")], n_ctx=400, budget=64)
    assert got[0].too_long and got[0].score == 0.5 and got[0].n_tokens == 0 and not got[0].forced
    assert not got[1].too_long and got[1].score > 0.5


def test_official_generation_stops_at_the_context():
    engine = FakeEngine(lambda passage, generated: "x", background=(-5.0, -6.0))
    (r,), _ = run(engine, [(QUERY_A, "doc")], budget=300, n_ctx=400)
    prompt_len = len(engine.tokenize(build_prompt(QUERY_A, "doc")))
    assert r.n_tokens == 400 - prompt_len + 1 and not r.forced  # as vLLM 0.7.2: until the sequence is longer


def test_rethink_then_budget_in_one_slot():
    def behaviour(passage, generated):
        if "Wait" not in generated:
            return scripted({"": "\nFirst thought.</think>"})(passage, generated)
        return "z"

    engine = FakeEngine(behaviour)
    (r,), _ = run(engine, [(QUERY_A, "doc")], rethink=1, budget=40)
    assert r.forced and r.n_tokens == 40
    assert r.reasoning.startswith("\nFirst thought.\nWaitzz") and "</think>" not in r.reasoning
    # the rethink replaced "</think>" (one token) by "\nWait"; the budget counts generated tokens only
    assert r.reasoning.count("z") == 40 - len(engine.tokenize("\nFirst thought.</think>"))


def test_cancelled_jobs_get_no_result_and_free_their_slot():
    engine = FakeEngine(scripted(SCRIPTS))
    pairs = pairs_for(QUERY_A, QUERY_B)
    got, stats = run(engine, pairs, parallel=2, cancelled=lambda job: job.pair.index in (1, 2, 6))
    assert [r.index for r in got] == [0, 3, 4, 5, 7] and stats.pairs == 5
    assert all(engine.seqs.get(s, []) == [] for s in (1, 2))  # every slot freed at the end
    full, _ = run(FakeEngine(scripted(SCRIPTS)), pairs, parallel=2)
    assert key(got) == key([full[r.index] for r in got])


def test_cancelling_a_running_job_frees_its_slot_mid_run():
    engine = FakeEngine(lambda passage, generated: "y")  # never closes
    started = []

    def cancelled(job):
        started.append(job.pair.index)
        return job.pair.index == 0 and started.count(0) > 5  # cancel pair 0 after a few steps

    got, _ = run(engine, [(QUERY_A, "slow doc"), (QUERY_A, "other doc")], parallel=1, budget=30,
                 cancelled=cancelled)
    assert [r.index for r in got] == [1] and got[0].n_tokens == 30


def test_results_arrive_as_they_finish():
    order = []
    engine = FakeEngine(scripted(SCRIPTS))
    run(engine, [(QUERY_A, "a long doc"), (QUERY_A, "a relevant doc")], parallel=2,
        on_result=lambda r: order.append(r.index))
    assert order == [1, 0]  # the short chain finishes first


def test_score_is_stable_for_extreme_logits():
    assert true_false_score(1000.0, 0.0) == 1.0 and true_false_score(0.0, 1000.0) == 0.0
    assert true_false_score(2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))


@pytest.mark.parametrize("protocol", ["official", "full"])
@pytest.mark.parametrize("budget", [8, 64])
def test_device_rows_give_the_host_rows_results(protocol, budget):
    """Rows holding only their top 20 candidates (llama.cpp's sampler in the graph) give every pair the result full
    rows give; an answer row whose candidates lack " true" or " false" is evaluated again on the host."""
    from fake_engine import DeviceEngine

    pairs = pairs_for(QUERY_A, QUERY_B)

    def answer(passage, generated):  # below the -10 filler: outside any top 20, so only the full row holds them
        return (-12.0, -13.0) if "relevant" in passage else (-13.5, -12.5)

    host, _ = run(FakeEngine(scripted(SCRIPTS), answer=answer), pairs, budget=budget, protocol=protocol)
    engine = DeviceEngine(scripted(SCRIPTS), answer=answer)
    device, _ = run(engine, pairs, budget=budget, protocol=protocol)
    assert key(device) == key(host)
    assert 0 < engine.host_rows < engine.device_rows  # each answer row again on the host, the rest on the device
