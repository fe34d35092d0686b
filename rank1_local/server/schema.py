"""The request and response shapes of ``/v1/rerank``: what Cohere, Jina, TEI and llama.cpp clients send and read.

- Cohere (v1 and v2), Jina, llama.cpp: ``{model, query, documents, top_n, return_documents}`` where a document
  is a string or ``{"text", "title"?}``; the answer is ``{id, model, results: [{index, relevance_score,
  document?}], usage, meta}``, best first.
- TEI: ``{query, texts, return_text, truncate}``; the answer is a bare list ``[{index, score, text?}]``.
- rank1's own options, each opt-in: ``instruction``, ``return_reasoning`` (the chain, ``forced`` and token
  counts per result), ``stream`` (server-sent events), and the protocol settings.
"""

from __future__ import annotations

import uuid
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from rank1_local.core.config import ScoringConfig
from rank1_local.core.dataset_prompts import resolve_dataset
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, Passage, make_passage, passage_text
from rank1_local.core.reranker import ranked
from rank1_local.core.results import Rank1Result, judgment_fields


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    title: str | None = None


class RerankRequest(BaseModel):
    """One rerank request. Unknown fields (Cohere's ``max_tokens_per_doc``, ``rank_fields`` …) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str | DocumentIn] | None = None
    texts: list[str] | None = None  # TEI
    # numbers and flags are taken as JSON numbers and booleans only: "2" or "yes" is refused, never guessed at
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    return_text: StrictBool = False  # TEI
    truncate: StrictBool | None = None  # TEI: cut long passages to fit (truncate_passages)
    instruction: str | None = None
    return_reasoning: StrictBool = False
    stream: StrictBool = False
    # protocol settings a request may choose (the context length is fixed when the model is loaded)
    max_think_tokens: StrictInt | None = Field(default=None, ge=1)
    rethink_rounds: StrictInt | None = Field(default=None, ge=0)
    protocol: Literal["official", "full"] | None = None
    truncate_passages: StrictBool | None = None
    dataset: str | None = None
    prompt: str | None = None

    @model_validator(mode="after")
    def _one_document_list(self) -> RerankRequest:
        if (self.documents is None) == (self.texts is None):
            raise ValueError("give the documents as `documents` (Cohere, Jina) or `texts` (TEI), one of them")
        if not self.passages:
            raise ValueError("no documents to rerank")
        return self

    @property
    def tei(self) -> bool:
        return self.texts is not None

    @cached_property
    def passages(self) -> list[Passage]:
        """The documents, each a string or ``{"text", "title"}`` (built once per request)."""
        if self.texts is not None:
            return list(self.texts)
        docs = self.documents or []
        return [d if isinstance(d, str) else make_passage(d.text, d.title) for d in docs]

    def pairs(self) -> list[Pair]:
        return [Pair(self.query, p, self.instruction) for p in self.passages]

    def total_chars(self) -> int:
        return len(self.query) + sum(len(p) if isinstance(p, str) else len(p["text"]) + len(p.get("title") or "")
                                     for p in self.passages)

    def config(self, base: ScoringConfig) -> ScoringConfig:
        """The server's protocol settings with this request's choices applied (validated; a bad value is a
        :class:`Rank1Error` naming it)."""
        changes: dict[str, Any] = {}
        for name in ("max_think_tokens", "rethink_rounds", "protocol", "truncate_passages"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        if self.truncate is not None and self.truncate_passages is None:
            changes["truncate_passages"] = self.truncate
        if self.dataset is not None and self.prompt is not None:
            raise Rank1Error("give `prompt` or `dataset`, not both")
        if self.dataset is not None:
            changes["prompt_template"] = resolve_dataset(self.dataset)
        elif self.prompt is not None:
            changes["prompt_template"] = self.prompt
        if not changes:
            return base
        fields = base.to_dict() | changes
        return ScoringConfig(**fields)


def result_row(request: RerankRequest, result: Rank1Result, *, reasoning: bool) -> dict[str, Any]:
    """One result in the request's shape."""
    passage = request.passages[result.index]
    text = passage_text(passage)
    if request.tei:
        row: dict[str, Any] = {"index": result.index, "score": result.score}
        if request.return_text:
            row["text"] = text
    else:
        row = {"index": result.index, "relevance_score": result.score}
        if request.return_documents:
            row["document"] = {"text": text} if isinstance(passage, str) else dict(passage)
    if result.stage is not None:  # a cascade: which stage scored it
        row["stage"] = result.stage
    if reasoning:
        row |= judgment_fields(result)
    return row


def usage(results: list[Rank1Result]) -> dict[str, int]:
    prompt = sum(r.n_prompt_tokens for r in results)
    completion = sum(r.n_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def rerank_response(request: RerankRequest, results: list[Rank1Result], model_name: str) -> Any:
    """The whole answer, best first, cut to ``top_n``."""
    rows = [result_row(request, r, reasoning=request.return_reasoning) for r in ranked(results, request.top_n)]
    if request.tei:
        return rows
    return {"id": str(uuid.uuid4()), "object": "list", "model": model_name, "results": rows,
            "usage": usage(results),
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}


def error_body(message: str, kind: str) -> dict[str, Any]:
    """The error shape (``message`` is what Cohere's SDK shows; ``error`` what TEI clients read)."""
    return {"message": message, "error": message, "error_type": kind}
