"""Prompt bytes exactly as the official rank1 code builds them."""

import pytest

from rank1_local.errors import Rank1Error
from rank1_local.prompt import build_prompt, format_passage, format_query

pytestmark = pytest.mark.quick


def test_prompt_bytes():
    assert build_prompt("q?", "p.") == (
        "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
        "Query: q?\nPassage: p.\n<think>")


def test_passage_title_and_text():
    assert format_passage({"title": "T", "text": "body"}) == "T body"
    assert format_passage({"title": "", "text": "body"}) == "body"
    assert format_passage("plain") == "plain"


def test_instruction_and_template():
    assert format_query("q", "find docs about x") == "q find docs about x"
    assert format_query("q", "q") == "q"
    assert format_query("q", None, "Claim: FILL_QUERY_HERE. Does the passage support it?") == \
        "Claim: q. Does the passage support it?"
    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        format_query("q", None, "no placeholder")
