"""The rank1 prompt, byte for byte as the official code (orionw/rank1, `rank1.py`) builds it: no chat template,
the tokenizer's own BOS, special tokens written in the text parsed."""

from __future__ import annotations

from collections.abc import Mapping

from rank1_local.core.errors import Rank1Error

PROMPT_HEAD = (
    "Determine if the following passage is relevant to the query. "
    "Answer only with 'true' or 'false'.\n"
    "Query: "
)
PASSAGE_SEPARATOR = "\nPassage: "
THINK_OPEN = "\n<think>"
THINK_CLOSE = "</think>"
QUERY_PLACEHOLDER = "FILL_QUERY_HERE"


def format_passage(passage: str | Mapping[str, str]) -> str:
    """A passage as the official ``predict`` reads it: plain text, or for a mapping ``f"{title} {text}"`` whenever it
    has a ``title`` key (even an empty one: the passage then starts with a space), else its ``text``."""
    if isinstance(passage, Mapping):
        text = passage.get("text") or ""
        return f"{passage['title']} {text}" if "title" in passage else text
    return passage


def format_query(query: str, instruction: str | None = None, template: str | None = None) -> str:
    """The query part of the prompt.

    ``instruction`` (FollowIR style), as the official ``predict`` applies it: ``f"{query} {instruction}".strip()``,
    or ``query.strip()`` when the two are equal (stripped); ``template`` is a dataset prompt in which
    ``FILL_QUERY_HERE`` is replaced by the query.
    """
    if instruction is not None:
        query = query.strip() if query.strip() == instruction.strip() else f"{query} {instruction}".strip()
    if template is not None:
        if QUERY_PLACEHOLDER not in template:
            raise Rank1Error(f"a prompt template must contain {QUERY_PLACEHOLDER!r}")
        query = template.replace(QUERY_PLACEHOLDER, query)
    return query


def prompt_prefix(query: str) -> str:
    """The part of the prompt shared by every passage of one (already formatted) query."""
    return PROMPT_HEAD + query + PASSAGE_SEPARATOR


def build_prompt(query: str, passage: str) -> str:
    """The full rank1 prompt for an already formatted query and passage, ending in ``\\n<think>``."""
    return prompt_prefix(query) + passage + THINK_OPEN
