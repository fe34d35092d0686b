"""The continuous-batching scheduler against a scripted engine (quick tier: no model, no torch)."""

from __future__ import annotations

import math

import pytest
from fake_engine import FALSE, TRUE, FakeEngine, scripted

from rank1_local.backends.llama_scheduler import Scheduler, SchedulerParams, make_jobs
from rank1_local.config import ScoringConfig
from rank1_local.pairs import prepare_pairs
from rank1_local.prompt import build_prompt, prompt_prefix
from rank1_local.protocol import common_prefix_len, fallback_prompt, true_false_score

pytestmark = pytest.mark.quick

SCRIPTS = {"relevant": "\nThe passage is relevant.</think>", "off": "\nOff topic, sadly.</think>",
           "long": "\nA long chain: one, two, three, four, five, six. Done.</think>"}
QUERY_A = "What is known about the apple?"
QUERY_B = "What is known about the anchor?"


def run(engine, pairs, *, parallel=2, budget=64, rethink=0, cancelled=None, on_result=None):
    config = ScoringConfig(max_think_tokens=budget, n_ctx=512, rethink_rounds=rethink)
    prepared = prepare_pairs(pairs, config, engine.tokenize, engine.detokenize)
    scheduler = Scheduler(engine, SchedulerParams(parallel, budget, rethink, TRUE, FALSE))
    return scheduler.run(make_jobs(prepared, engine.tokenize), on_result=on_result, cancelled=cancelled)


def pairs_for(*queries):
    docs = ["a relevant doc", "an off doc", "a long doc", "another relevant doc"]
    return [(q, d) for q in queries for d in docs]


def test_closed_chain_is_scored_at_the_answer():
    engine = FakeEngine(scripted(SCRIPTS))
    (r,), stats = run(engine, [(QUERY_A, "a relevant doc")])
    assert r.reasoning == "\nThe passage is relevant." and not r.forced
    assert r.n_tokens == len(engine.tokenize(SCRIPTS["relevant"]))
    assert r.score == pytest.approx(true_false_score(1.0, 0.0))
    assert stats.generated_tokens == r.n_tokens and stats.pairs == 1


def test_slots_are_refilled_and_results_keep_input_order():
    pairs = pairs_for(QUERY_A)[:3] * 3
    pairs = [(q, f"{d} {i}") for i, (q, d) in enumerate(pairs)]
    one, _ = run(FakeEngine(scripted(SCRIPTS)), pairs, parallel=1)
    engine = FakeEngine(scripted(SCRIPTS))
    many, _ = run(engine, pairs, parallel=3)
    assert [r.index for r in many] == list(range(len(pairs)))
    assert [(r.reasoning, r.score, r.n_tokens) for r in many] == [(r.reasoning, r.score, r.n_tokens) for r in one]
    assert set(engine.seqs) <= {0, 1, 2, 3}  # the prefix sequence and three slots, never more
    # with three slots busy, steps decode several sequences at once
    assert engine.decode_calls < sum(r.n_tokens for r in one)


def test_prompts_longer_than_a_batch_are_fed_in_chunks():
    pairs = pairs_for(QUERY_A, QUERY_B)
    wide, _ = run(FakeEngine(scripted(SCRIPTS), n_batch=512), pairs, parallel=4)
    engine = FakeEngine(scripted(SCRIPTS), n_batch=16)
    narrow, _ = run(engine, pairs, parallel=4)
    assert max(engine.batch_sizes) == 16
    assert [(r.reasoning, r.score) for r in narrow] == [(r.reasoning, r.score) for r in wide]


def test_prefix_switch_mid_run_evaluates_each_prefix_once():
    engine = FakeEngine(scripted(SCRIPTS))
    pairs = pairs_for(QUERY_A, QUERY_B)
    interleaved = pairs[::2] + pairs[1::2]  # queries alternate: jobs are regrouped by query
    got, stats = run(engine, interleaved, parallel=2)
    seq, _ = run(FakeEngine(scripted(SCRIPTS)), interleaved, parallel=1)
    assert [(r.reasoning, r.score) for r in got] == [(r.reasoning, r.score) for r in seq]
    prefixes = [engine.tokenize(prompt_prefix(q))[:-1] for q in (QUERY_A, QUERY_B)]
    shared = common_prefix_len(*prefixes)
    assert 0 < shared < len(prefixes[1])
    expected = len(prefixes[0]) + len(prefixes[1]) - shared
    expected += sum(len(engine.tokenize(build_prompt(q, d))) - len(prefixes[q == QUERY_B]) for q, d in pairs)
    assert stats.prompt_tokens == expected


def test_budget_forces_the_answer():
    engine = FakeEngine(lambda passage, generated: "x" if len(generated) < 10 else ".")
    (r,), _ = run(engine, [(QUERY_A, "doc")], budget=25)
    assert r.forced and r.n_tokens == 25 and r.reasoning.startswith("xxxxxxxxxx.")


def test_end_of_generation_forces_the_answer_on_the_fallback_prompt():
    seen = []

    def answer(passage, generated):
        seen.append(generated)
        return 0.3, 0.1

    engine = FakeEngine(scripted({"doc": "\nHmm"}), answer=answer)
    (r,), _ = run(engine, [(QUERY_A, "doc")])
    assert r.forced and r.n_tokens == 4 and r.reasoning == "\nHmm"
    prompt = build_prompt(QUERY_A, "doc")
    assert prompt + seen[-1] == fallback_prompt(prompt, "\nHmm")
    assert r.score == pytest.approx(true_false_score(0.3, 0.1))


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
    calls = {"n": 0}

    def cancelled(job):
        calls["n"] += 1
        return job.pair.index in (1, 2, 6)

    got, stats = run(engine, pairs, parallel=2, cancelled=cancelled)
    assert [r.index for r in got] == [0, 3, 4, 5, 7] and stats.pairs == 5
    assert all(engine.seqs.get(s, []) == [] for s in (1, 2))  # every slot freed at the end
    full, _ = run(FakeEngine(scripted(SCRIPTS)), pairs, parallel=2)
    assert [(r.reasoning, r.score) for r in got] == [(full[r.index].reasoning, full[r.index].score) for r in got]


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
    run(engine, [(QUERY_A, "a long doc"), (QUERY_A, "a relevant doc")], parallel=2, on_result=lambda r: order.append(r.index))
    assert order == [1, 0]  # the short chain finishes first


def test_score_is_stable_for_extreme_logits():
    assert true_false_score(1000.0, 0.0) == 1.0 and true_false_score(0.0, 1000.0) == 0.0
    assert true_false_score(2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
