"""The rank1 rules as pure functions (quick tier)."""

from __future__ import annotations

import pytest

from rank1_local.errors import Rank1Error, UnsupportedModelError
from rank1_local.protocol import (
    ReasoningChain,
    Step,
    answer_token_ids,
    common_prefix_len,
    cut_to_sentence,
    fallback_prompt,
)

pytestmark = pytest.mark.quick


def test_cut_to_sentence():
    assert cut_to_sentence("One. Two") == "One."
    assert cut_to_sentence("One. Two!") == "One. Two!"
    assert cut_to_sentence("Is it? Maybe so") == "Is it?"


def test_fallback_prompt_closes_the_reasoning():
    assert fallback_prompt("P<think>", "\nOne. Two") == "P<think>\n\nOne.\n</think>"


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
    with pytest.raises(UnsupportedModelError, match="not a rank1-style model"):
        answer_token_ids(lambda t: split[t])


def test_chain_closes_on_think_close_split_over_tokens():
    chain = ReasoningChain("P", budget=10)
    assert [chain.advance(i, piece, False) for i, piece in enumerate([b"ok.", b"</", b"think", b">"])] == \
        [Step.CONTINUE, Step.CONTINUE, Step.CONTINUE, Step.ANSWER]
    assert chain.reasoning == "ok." and chain.n_tokens == 4 and not chain.forced


def test_chain_budget_and_end_of_generation():
    chain = ReasoningChain("P", budget=2)
    assert chain.advance(0, b"a", False) is Step.CONTINUE
    assert chain.advance(0, b"b.", False) is Step.FORCE and chain.forced and chain.n_tokens == 2
    eog = ReasoningChain("P", budget=5)
    assert eog.advance(0, b"", True) is Step.FORCE and eog.n_tokens == 0 and eog.forced


def test_chain_rethink_replaces_the_close_with_wait():
    chain = ReasoningChain("P", budget=10, rethinks_left=1)
    chain.advance(0, b"x.", False)
    assert chain.advance(1, b"</think>", False) is Step.RETHINK
    assert chain.continuation_prompt == "Px.\nWait" and chain.rethinks_left == 0
    assert chain.advance(2, b"</think>", False) is Step.ANSWER and chain.reasoning == "x.\nWait"


def test_multibyte_text_split_over_tokens():
    chain = ReasoningChain("P", budget=10)
    snow = "☃".encode()
    chain.advance(0, snow[:2], False)
    chain.advance(1, snow[2:] + b"</think>", False)
    assert chain.reasoning == "☃"


def test_prompt_template_without_placeholder_is_a_plain_error():
    from rank1_local.prompt import format_query

    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        format_query("q", None, "no placeholder")
