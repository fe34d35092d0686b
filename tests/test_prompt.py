"""Prompt bytes exactly as the official rank1 code builds them."""

import pytest

from rank1_local.core.errors import Rank1Error
from rank1_local.core.prompt import build_prompt, format_passage, format_query

pytestmark = pytest.mark.quick


def test_prompt_bytes():
    assert build_prompt("q?", "p.") == (
        "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
        "Query: q?\nPassage: p.\n<think>")


def test_passage_title_and_text_as_the_official_predict():
    assert format_passage({"title": "T", "text": "body"}) == "T body"
    assert format_passage({"title": "", "text": "body"}) == " body"  # a title key, even empty, counts
    assert format_passage({"text": "body"}) == "body"
    assert format_passage("plain") == "plain"


def test_instruction_and_template():
    assert format_query("q", "find docs about x") == "q find docs about x"
    assert format_query(" q ", " q") == "q"  # equal once stripped: the query, stripped
    assert format_query("q ", "") == "q"  # f"{q} {i}".strip()
    assert format_query(" q", None) == " q"  # no instruction: untouched
    assert format_query("q", None, "Claim: FILL_QUERY_HERE. Does the passage support it?") == \
        "Claim: q. Does the passage support it?"
    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        format_query("q", None, "no placeholder")


# sha256 of each template in the official prompts.py (orionw/rank1 at 30585c2), blank lines and trailing spaces
# included: any change to a byte fails here
OFFICIAL_TEMPLATE_SHA256 = {
    "SciFact": "dfaba5f68af98a01b8cd8b90b433eb0513589360f2f18a3796449e670d076f90",
    "ClimateFEVER": "b777d8aac14d5cf0d206e9710f4037641c6487c33a182c69317b8c5a6e5497bc",
    "TRECCOVID": "05ec31997b1f2f9ffd4231625d7128326fb94f51d7dc73844bb3a1d2bd6b9f95",
    "ArguAna": "4cc892ba0f9ec3f727fb8d5908f7c823e23f0372a578177298ac49c04583f69a",
    "DBPedia": "d7233704c1263166c0c752dd6e245b147349b2fe76d0954560e069f09b2328e1",
    "FiQA2018": "3375481cc216aa9b34ea1373f037760e229f1fd97bba213c4eb1094cb9aff7b5",
    "NFCorpus": "567df6a34169237b906ebc10b6a16064bab45ef300cd1682140463e89065904f",
    "Touche2020": "1fbec2847561aa927a4458a3d51449246bf77e55db65911f36dc22f59cf85894",
    "SCIDOCS": "5ac7ed96fbb7b73e855e4d731eed55f93615b1e149c784f3294e628a8233b208",
    "BrightRetrieval_aops": "9fa52fe1f21417e012a6a1348901d70df5bde38228f2dbdb17d8df5c7a1d0bb7",
    "BrightRetrieval_theoremqa_questions": "b6647ca1ac602a4ddde80827a0a1f57e77970726b4acd581131e0b96bf66efbc",
    "BrightRetrieval_leetcode": "bf07e7592e100a6458af22a6caa5f995634a71fdcba9c57cda243fa4e6eb1e71",
    "BrightRetrieval_pony": "054f74e9d323133b86e8a45245fbbfc888fa47827d4c00cd7b8c10d6bcd9ca31",
    "BrightRetrieval": "6d7557f02ea5303fe2e5bb59df929879282143a84fc02d7ac2056f0b15d2e945",
    "BrightRetrieval_theoremqa_theorems": "b6647ca1ac602a4ddde80827a0a1f57e77970726b4acd581131e0b96bf66efbc",
}


@pytest.mark.parametrize("name", list(OFFICIAL_TEMPLATE_SHA256))
def test_dataset_prompts_are_the_official_bytes(name):
    import hashlib

    from rank1_local.core.dataset_prompts import DATASET_PROMPTS

    assert hashlib.sha256(DATASET_PROMPTS[name].encode()).hexdigest() == OFFICIAL_TEMPLATE_SHA256[name]
    assert "FILL_QUERY_HERE" in DATASET_PROMPTS[name]


def test_dataset_prompt_choice_as_get_prompt():
    from rank1_local.core.dataset_prompts import DATASET_PROMPTS, dataset_prompt

    assert set(DATASET_PROMPTS) == set(OFFICIAL_TEMPLATE_SHA256)
    assert dataset_prompt("BrightRetrieval", "aops") == DATASET_PROMPTS["BrightRetrieval_aops"]
    assert dataset_prompt("BrightRetrieval", "biology") == DATASET_PROMPTS["BrightRetrieval"]
    assert dataset_prompt("SciFact", "default") == dataset_prompt("SciFact") == DATASET_PROMPTS["SciFact"]
    assert dataset_prompt("NQ") is None and dataset_prompt("Unknown", "aops") is None
    assert DATASET_PROMPTS["ClimateFEVER"].endswith("cite it.\n\n")
