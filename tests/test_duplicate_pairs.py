"""The pipeline's stages without a model (quick tier): pairs with the same prompt are judged once, every pair gets
its result (copies right after the result they copy), too-long pairs are left alone, and a backend that scores in
the caller's thread (transformers, vLLM) goes through the same stages."""

from __future__ import annotations

import dataclasses

import pytest
from fake_engine import FakeEngine, scripted
from pipeline_support import run, serial_pipeline

from rank1_local.core.config import ScoringConfig
from rank1_local.core.duplicates import find_duplicates
from rank1_local.core.pairs import prepare_pairs
from rank1_local.core.results import build_result, too_long_result

pytestmark = pytest.mark.quick

CONFIG = ScoringConfig(max_think_tokens=64, n_ctx=2048)


def prepared(pairs, config=CONFIG):
    engine = FakeEngine(scripted({}))
    return prepare_pairs(pairs, config, engine.tokenize, engine.detokenize)


class Scorer:
    """Scores each pair by its prompt length; remembers what it was asked to score, reports as it goes."""

    def __init__(self) -> None:
        self.asked = []

    def __call__(self, todo, config, deliver, cancelled):
        self.asked.append([p.index for p in todo])
        for p in todo:
            deliver(p, too_long_result(p) if p.too_long else build_result(
                p, score=len(p.prompt) / 1e4, reasoning=f"r{p.index}", n_tokens=3, forced=False, seconds=0.1))


def pipeline(scorer, config=CONFIG):
    return serial_pipeline(FakeEngine(scripted({})), scorer, config)


def test_same_prompt_is_scored_once_and_every_pair_gets_its_result():
    pairs = [("q", "a"), ("q", "b"), ("q", "a"), ("other q", "a"), ("q", "b"), ("q", "a", "")]
    scorer, seen = Scorer(), []
    p = pipeline(scorer)
    results, stats = run(p, pairs, on_result=seen.append)
    assert scorer.asked == [[0, 1, 3]]
    assert [r.index for r in results] == list(range(6)) and sorted(r.index for r in seen) == list(range(6))
    for copy, first in [(2, 0), (4, 1), (5, 0)]:
        assert dataclasses.replace(results[copy], index=first) == results[first]
    assert results[0].score != results[3].score  # another query is another prompt
    seen_order = [r.index for r in seen]
    assert seen_order.index(2) == seen_order.index(0) + 1  # a copy comes right after the result it copies
    assert stats.pairs == 3 and p.counters.pairs == 6


def test_no_duplicates_passes_straight_through():
    scorer = Scorer()
    results, _ = run(pipeline(scorer), [("q", "a"), ("q", "b")])
    assert scorer.asked == [[0, 1]] and [r.reasoning for r in results] == ["r0", "r1"]


def test_too_long_pairs_are_left_alone():
    tight = ScoringConfig(max_think_tokens=8, n_ctx=128, truncate_passages=False)
    pairs = [("q", "word " * 200), ("q", "word " * 200), ("q", "a"), ("q", "a")]
    batch = prepared(pairs, tight)
    assert [p.too_long for p in batch] == [True, True, False, False]
    duplicates = find_duplicates(batch)
    assert [p.index for p in duplicates.unique] == [0, 1, 2] and duplicates.copies == {2: (3,)}
    assert duplicates.count == 1
    results, _ = run(pipeline(Scorer(), tight), pairs)
    assert [r.too_long for r in results] == [True, True, False, False] and results[3].score == results[2].score


def test_a_backend_failure_reaches_the_caller():
    def broken(todo, config, deliver, cancelled):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run(pipeline(broken), [("q", "a")])
