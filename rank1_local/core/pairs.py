"""From input pairs to prompts: validation, query/passage formatting, fitting the context.

Every backend (llama.cpp, transformers, vLLM) goes through :func:`prepare_pairs`, so all of them build the exact
same prompt token ids from the same input, and every bad input is refused before the first slow step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from rank1_local.core.cards import RANK1, ModelCard
from rank1_local.core.config import FALLBACK_MARGIN, ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.prompt import build_prompt, format_passage, format_query
from rank1_local.core.protocol import NO_SCORE

logger = logging.getLogger(__name__)

Passage = Union[str, Mapping[str, str]]
Tokenize = Callable[[str], list[int]]
Detokenize = Callable[[list[int]], str]


def make_passage(text: str, title: str | None = None) -> Passage:
    """A passage as every input reader builds it (documents files, pairs files, server requests): ``{"title",
    "text"}`` when there is a non-empty title, else the text itself."""
    return {"title": title, "text": text} if title else text


def passage_text(passage: Passage) -> str:
    """The passage's own text (without its title), as shown in tables and returned to clients."""
    return passage if isinstance(passage, str) else passage["text"]


@dataclass(frozen=True)
class Pair:
    """One (query, passage[, instruction]) to score."""

    query: str
    passage: Passage
    instruction: str | None = None


@dataclass(frozen=True)
class PreparedPair:
    """A pair ready to run: its formatted query, the full prompt and its token ids."""

    index: int  # position in the caller's input
    query: str  # the query as it appears in the prompt (instruction and template applied)
    prompt: str
    ids: list[int]
    passage_tokens_dropped: int = 0
    too_long: bool = False  # the prompt fills the context: not run, scored 0.5 (as the official code does)

    @property
    def truncated(self) -> bool:
        return self.passage_tokens_dropped > 0


def check_text(what: str, text: Any, *, allow_empty: bool = False) -> str:
    """``text`` as a valid UTF-8 ``str`` (non-empty unless ``allow_empty``), or a :class:`Rank1Error` naming
    ``what``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise Rank1Error(f"{what} is not valid UTF-8") from None
    if not isinstance(text, str):
        raise Rank1Error(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rank1Error(f"{what} is not valid UTF-8 (contains unpaired surrogates)") from None
    if not text.strip() and not allow_empty:
        raise Rank1Error(f"{what} is empty")
    return text


def normalize_pairs(pairs: Sequence[Pair | Sequence[Any]]) -> list[Pair]:
    out = []
    for i, item in enumerate(pairs):
        if isinstance(item, Pair):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            out.append(Pair(*item))
        else:
            raise Rank1Error(f"pair {i} must be (query, passage) or (query, passage, instruction)")
    return out


def formatted(pair: Pair, index: int, template: str | None, *, instruction_into_query: bool = True) -> tuple[str, str]:
    """The pair's query (instruction and template applied, as rank1's official code applies them) and passage
    text, validated (with ``instruction_into_query=False``: the query as given, its instruction checked only)."""
    query = check_text(f"query of pair {index}", pair.query)
    if isinstance(pair.passage, Mapping):
        if not isinstance(pair.passage.get("text"), str):
            raise Rank1Error(f"passage of pair {index} is a mapping without a 'text' string (keys: "
                             f"{', '.join(map(str, pair.passage)) or 'none'})")
        passage = format_passage(pair.passage)
    else:
        passage = pair.passage
    passage = check_text(f"passage of pair {index}", passage, allow_empty=True)
    if not passage.strip():
        logger.warning("the passage of pair %d is empty; it is scored as the official code does", index)
    instruction = None
    if pair.instruction is not None:
        instruction = check_text(f"instruction of pair {index}", pair.instruction, allow_empty=True)
    if not instruction_into_query:
        return query, passage
    return format_query(query, instruction, template), passage


def fit_prompt(index: int, query: str, passage: str, config: ScoringConfig, tokenize: Tokenize,
               detokenize: Detokenize) -> PreparedPair:
    """The prompt for (query, passage), with the passage cut by tokens so that prompt + reasoning budget
    fit in ``config.n_ctx``. The query (with its instruction/template) is never cut."""
    limit = config.n_ctx - config.max_think_tokens - FALLBACK_MARGIN
    prompt = build_prompt(query, passage)
    ids = tokenize(prompt)
    if len(ids) <= limit:
        return PreparedPair(index, query, prompt, ids)
    bos = len(tokenize(""))
    passage_ids = tokenize(passage)[bos:]
    keep = len(passage_ids) - (len(ids) - limit)
    while keep > 0:
        prompt = build_prompt(query, detokenize(passage_ids[:keep]))
        ids = tokenize(prompt)
        if len(ids) <= limit:
            return PreparedPair(index, query, prompt, ids, len(passage_ids) - keep)
        keep -= max(1, len(ids) - limit)
    raise Rank1Error(f"the query of pair {index} (with its instruction/template) leaves no room for a passage in a "
                     f"context of {config.n_ctx} tokens with a {config.max_think_tokens}-token reasoning budget; "
                     "raise n_ctx or lower max_think_tokens")


def tokenize_spans(card: ModelCard, spans: Sequence[str], tokenize: Tokenize) -> list[int]:
    """A prompt's ids as its card tokenizes it: the whole text at once, or span by span, joined."""
    if not card.split:
        return tokenize("".join(spans))
    bos = len(tokenize(""))
    return [t for i, span in enumerate(spans) for t in tokenize(span)[bos if i else 0:]]


def fit_spans(index: int, card: ModelCard, query: str, passage: str, n_ctx: int, tokenize: Tokenize,
              detokenize: Detokenize) -> PreparedPair:
    """A PREFILL card's prompt cut as its official code cuts it: the middle span (query and passage), tokenized on
    its own, keeps its first tokens, as many as fit ``n_ctx`` beside the head and the tail."""
    head, middle, tail = card.spans(query, passage)
    bos = len(tokenize(""))
    parts = [tokenize(head), tokenize(middle)[bos:], tokenize(tail)[bos:]]
    room = n_ctx - len(parts[0]) - len(parts[2])
    if room < 1:
        raise Rank1Error(f"the card's own prompt ({len(parts[0]) + len(parts[2])} tokens) leaves no room in a context "
                         f"of {n_ctx} tokens; raise n_ctx")
    dropped = max(0, len(parts[1]) - room)
    if dropped:
        parts[1] = parts[1][:room]
        middle = detokenize(parts[1])
    ids = [t for part in parts for t in part]
    return PreparedPair(index, query, head + middle + tail, ids, passage_tokens_dropped=dropped)


def prepare_pairs(pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig, tokenize: Tokenize,
                  detokenize: Detokenize, card: ModelCard = RANK1) -> list[PreparedPair]:
    """Validate, format and tokenize every pair (all of them before any is scored), as ``card`` builds prompts. For
    rank1, with ``config.truncate_passages`` passages are cut to fit; otherwise a prompt that leaves no room in the
    context for even one generated token is marked ``too_long``. A card whose official code cuts long prompts (Qwen3-
    Reranker) cuts them the same way."""
    prepared = []
    for i, pair in enumerate(normalize_pairs(pairs)):
        if not card.reasons:
            query, passage = formatted(pair, i, None, instruction_into_query=False)
            query = card.query_text(query, pair.instruction)
            prepared.append(fit_spans(i, card, query, passage, config.n_ctx, tokenize, detokenize))
            continue
        query, passage = formatted(pair, i, config.prompt_template)
        if config.truncate_passages:
            prepared.append(fit_prompt(i, query, passage, config, tokenize, detokenize))
            continue
        prompt = card.prompt(query, passage)
        ids = tokenize_spans(card, card.spans(query, passage), tokenize)
        too_long = not config.fits(len(ids))
        if too_long:
            logger.warning("pair %d: its prompt (%d tokens) does not fit the context of %d tokens; it scores %.1f "
                           "(truncate_passages cuts the passage instead)", i, len(ids), config.n_ctx, NO_SCORE)
        prepared.append(PreparedPair(i, query, prompt, ids, too_long=too_long))
    return prepared
