"""The rank1 step on scripted rows (quick tier): :class:`PairDecoder` alone, each rule of the protocol with a case —
the stop strings, the end of sequence (and its token count), an answer outside the top 20, ``</think>`` without an
answer, the budget, the cut of the fallback, a fallback longer than the context, the full protocol, rethinks — and
the rows' greedy choice, which gives ties to the lowest token id."""

from __future__ import annotations

import numpy as np
import pytest
from fake_engine import BYTE0, CLOSE, EOG, FALSE, N_VOCAB, TRUE, FakeEngine, scripted

from rank1_local.core.config import ScoringConfig
from rank1_local.core.decoder import Become, CandidateRow, Done, Feed, HostRow, PairDecoder, RowUnavailable
from rank1_local.core.pairs import prepare_pairs
from rank1_local.core.protocol import NO_SCORE, fallback_prompt, true_false_score

pytestmark = pytest.mark.quick

VOCAB = FakeEngine(scripted({}))  # tokens: 0 end, 1 " true", 2 " false", 3 "</think>", 4 "<think>", then bytes


def row(best: int, *, answers: tuple[float, float] | None = None, fill: float = -10.0) -> HostRow:
    """A row whose greedy choice is ``best`` (logit 10); ``answers``: the logits of " true" and " false" (default:
    far below, outside any top 20)."""
    logits = np.full(N_VOCAB, fill, dtype=np.float32)
    logits[TRUE], logits[FALSE] = answers if answers is not None else (-30.0, -30.0)
    logits[best] = 10.0
    return HostRow(logits)


def byte(ch: str) -> int:
    return BYTE0 + ord(ch)


def decoder(budget=64, n_ctx=512, protocol="official", rethink=0, passage="doc"):
    config = ScoringConfig(max_think_tokens=budget, n_ctx=n_ctx, protocol=protocol, rethink_rounds=rethink)
    (pair,) = prepare_pairs([("q", passage)], config, VOCAB.tokenize, VOCAB.detokenize)
    return PairDecoder(pair, config, n_ctx, VOCAB, (TRUE, FALSE)), pair


def feed_text(d, text):
    """Rows that write ``text`` (one token each), until the decoder does something else than feed; the actions."""
    actions = []
    for token in VOCAB.tokenize(text):
        actions.append(d.step(row(token)))
        if not isinstance(actions[-1], Feed):
            break
    return actions


def test_the_stop_string_ends_it_and_the_answer_row_scores():
    d, _ = decoder()
    assert all(isinstance(a, Feed) for a in feed_text(d, "\nYes.</think>"))
    done = d.step(row(TRUE, answers=(10.0, 8.0)))  # " true" chosen: "</think> true" is there
    assert isinstance(done, Done) and done.score == pytest.approx(true_false_score(10.0, 8.0))
    result = d.result(done.score)
    assert result.reasoning == "\nYes." and result.n_tokens == len(VOCAB.tokenize("\nYes.</think>")) + 1
    assert not result.forced


def test_an_answer_outside_the_top_20_goes_to_the_fallback():
    d, pair = decoder()
    feed_text(d, "\nYes.</think>")
    logits = np.linspace(0.0, 5.0, N_VOCAB).astype(np.float32)  # 20+ tokens above " false"
    logits[TRUE], logits[FALSE] = 100.0, -5.0
    action = d.step(HostRow(logits))
    assert isinstance(action, Become) and d.answering
    assert action.ids == VOCAB.tokenize(fallback_prompt(pair.prompt, "\nYes."))
    done = d.step(row(7, answers=(0.3, 0.1)))  # the answer position: the two logits, whatever is greedy
    assert done.score == pytest.approx(true_false_score(0.3, 0.1)) and d.result(done.score).forced


def test_end_of_sequence_is_counted_and_read_from_its_own_row():
    d, _ = decoder()
    feed_text(d, "\nHmm")
    done = d.step(row(EOG, answers=(2.0, 1.0)))  # ended by the model: its row's top 20 hold both answers
    assert isinstance(done, Done) and done.score == pytest.approx(true_false_score(2.0, 1.0))
    assert d.result(done.score).n_tokens == 4 + 1  # vLLM counts the end-of-sequence token


def test_think_close_without_an_answer_goes_on_to_the_budget_then_falls_back():
    d, pair = decoder(budget=8)
    actions = feed_text(d, "\nNo.</think>\nZZ")
    assert len(actions) == 8 and isinstance(actions[-1], Become)  # the budget, no answer in the top 20
    assert actions[-1].ids == VOCAB.tokenize(fallback_prompt(pair.prompt, "\nNo.</think>\nZZ"))


def test_the_fallback_cuts_back_to_the_last_sentence_end():
    d, pair = decoder(budget=12)
    actions = feed_text(d, "\nFirst. Then some")
    assert len(actions) == 12 and isinstance(actions[-1], Become)
    assert VOCAB.detokenize(actions[-1].ids) == pair.prompt + "\nFirst.\n</think>"


def test_a_fallback_longer_than_the_context_scores_half():
    d, _ = decoder(budget=30, n_ctx=len(VOCAB.tokenize(pair_prompt())) + 31)
    actions = feed_text(d, "\n" + "x" * 29)
    assert actions[-1] == Done(NO_SCORE)


def pair_prompt():
    _, pair = decoder()
    return pair.prompt


def test_the_full_protocol_reads_the_answer_right_after_think_close():
    d, _ = decoder(protocol="full")
    actions = feed_text(d, "\nYes.</think>")
    assert isinstance(actions[-1], Feed) and actions[-1].token == CLOSE and d.answering
    done = d.step(row(42, answers=(-1.0, 3.0)))  # the answer's distribution, whatever its greedy token
    assert done.score == pytest.approx(true_false_score(-1.0, 3.0))


def test_rethink_replaces_think_close_and_goes_on():
    d, pair = decoder(rethink=1)
    actions = feed_text(d, "\nYes.</think>")
    assert isinstance(actions[-1], Become)
    assert VOCAB.detokenize(actions[-1].ids) == pair.prompt + "\nYes.\nWait"


def test_greedy_ties_go_to_the_lowest_id_on_every_row():
    logits = np.full(N_VOCAB, -1.0, dtype=np.float32)
    logits[[byte("b"), byte("a")]] = 5.0  # "a" has the lower id
    assert HostRow(logits).best() == byte("a")
    candidates = CandidateRow([byte("b"), byte("a"), 9], [5.0, 5.0, 1.0])  # the device's order, any
    assert candidates.best() == byte("a")


def test_a_device_row_says_when_it_cannot_tell():
    candidates = CandidateRow([TRUE, 9], [1.0, 0.5])
    with pytest.raises(RowUnavailable):
        candidates.logits((TRUE, FALSE))
    with pytest.raises(RowUnavailable):
        candidates.top(20)
    assert candidates.logits((TRUE,)) == [1.0]
