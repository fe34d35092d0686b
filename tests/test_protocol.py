"""The rank1 rules as pure functions (quick tier)."""

from __future__ import annotations

import math

import pytest

from rank1_local.core.errors import Rank1Error, UnsupportedModelError
from rank1_local.core.protocol import (
    ReasoningChain,
    Step,
    answer_score,
    answer_token_ids,
    common_prefix_len,
    cut_reasoning,
    fallback_prompt,
    top_logprobs,
    true_false_score,
)

pytestmark = pytest.mark.quick


def test_official_cut():
    assert cut_reasoning("\nOne. Two") == "One."
    assert cut_reasoning("One. Two!  \n") == "One. Two!"
    assert cut_reasoning("Is it? Maybe so") == "Is it?"
    assert cut_reasoning("\n  no sentence end at all  ") == "no sentence end at all"  # kept whole, stripped
    assert cut_reasoning("") == ""


def test_fallback_prompt_closes_the_reasoning():
    assert fallback_prompt("P<think>", "\nOne. Two") == "P<think>\nOne.\n</think>"


def test_top_20_and_the_answer_score():
    logits = [float(i) for i in range(40)]  # token 39 most likely
    top = top_logprobs(logits)
    assert sorted(top) == list(range(20, 40)) and sum(math.exp(v) for v in top.values()) < 1.0
    assert answer_score(top, 39, 25) == pytest.approx(true_false_score(39.0, 25.0))
    assert answer_score(top, 39, 5) is None  # an answer outside the top 20: the fallback decides
    assert answer_score({}, 1, 2) is None


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len("abc", "abd") == 2
    assert common_prefix_len([], [1]) == 0


def test_answer_token_ids_need_single_tokens():
    vocab = {" true": [7], " false": [8], "": []}
    assert answer_token_ids(lambda t: vocab[t]) == (7, 8)
    with_bos = {" true": [1, 7], " false": [1, 8], "": [1]}
    assert answer_token_ids(lambda t: with_bos[t]) == (7, 8)
    split = {" true": [7, 9], " false": [8], "": []}
    with pytest.raises(UnsupportedModelError, match="not a rank1 model"):
        answer_token_ids(lambda t: split[t])


def test_chain_closes_on_think_close_split_over_tokens():
    chain = ReasoningChain("P", budget=10, official=False)
    assert [chain.advance(i, piece, False) for i, piece in enumerate([b"ok.", b"</", b"think", b">"])] == \
        [Step.CONTINUE, Step.CONTINUE, Step.CONTINUE, Step.ANSWER]
    assert chain.reasoning == "ok." and chain.n_tokens == 4 and not chain.forced


def test_chain_budget_and_end_of_generation():
    chain = ReasoningChain("P", budget=2, official=False)
    assert chain.advance(0, b"a", False) is Step.CONTINUE
    assert chain.advance(0, b"b.", False) is Step.FORCE and chain.forced and chain.n_tokens == 2
    eog = ReasoningChain("P", budget=5, official=False)
    assert eog.advance(0, b"", True) is Step.FORCE and eog.n_tokens == 0 and eog.forced
    official = ReasoningChain("P", budget=5)
    assert official.advance(0, b"", True) is Step.FINISH and official.n_tokens == 1 and not official.forced


def test_official_chain_stops_on_the_stop_strings_only():
    chain = ReasoningChain("P", budget=50)
    steps = [chain.advance(0, piece, False) for piece in (b"ok.", b"</think>", b"\n", b"</think>", b" tr")]
    assert steps == [Step.CONTINUE] * 5
    assert chain.advance(0, b"ue.", False) is Step.FINISH
    assert chain.output_text == "ok.</think>\n" and chain.reasoning == "ok."
    assert chain.fallback_prompt == "P\nok.\n</think>"  # the text without the stop string, cut after "."
    short = ReasoningChain("P", budget=50, n_ctx=10)
    assert short.advance(0, b"x", False, seq_len=10) is Step.CONTINUE  # the context is full: as vLLM 0.7.2 ...
    assert short.advance(0, b"x", False, seq_len=11) is Step.FINISH  # ... it ends once the sequence is longer


def test_chain_rethink_replaces_the_close_with_wait():
    chain = ReasoningChain("P", budget=10, rethinks_left=1, official=False)
    chain.advance(0, b"x.", False)
    assert chain.advance(1, b"</think>", False) is Step.RETHINK
    assert chain.continuation_prompt == "Px.\nWait" and chain.rethinks_left == 0
    assert chain.advance(2, b"</think>", False) is Step.ANSWER and chain.reasoning == "x.\nWait"


def test_multibyte_text_split_over_tokens():
    chain = ReasoningChain("P", budget=10, official=False)
    snow = "☃".encode()
    chain.advance(0, snow[:2], False)
    chain.advance(1, snow[2:] + b"</think>", False)
    assert chain.reasoning == "☃"


def test_prompt_template_without_placeholder_is_a_plain_error():
    from rank1_local.core.prompt import format_query

    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        format_query("q", None, "no placeholder")


def test_byte_level_alphabet():
    from rank1_local.backends.hf import byte_level_alphabet

    alphabet = byte_level_alphabet()
    assert len(set(alphabet.values())) == 256
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ" and alphabet[ord("a")] == "a"
