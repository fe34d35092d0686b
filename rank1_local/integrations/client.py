"""The one client every framework integration uses: rank1 judgments from an in-process model or a running server.

``Rank1Client(model)`` takes

- a loaded :class:`~rank1_local.core.reranker.Reranker` (``Rank1``, or the transformers / vLLM backends): called in
  this process, and left open (its owner closes it);
- a model path (or hub id): a :class:`~rank1_local.backends.llama.facade.Rank1` is loaded with the given protocol
  settings, judgment cache and engine settings, and closed with the client;
- the URL of a running ``rank1-local serve``: ``POST {url}/v1/rerank`` with ``return_reasoning: true`` (httpx, the
  ``client`` extra), with the API key as a bearer token.

Either way a call gives one :class:`Judgment` per document (score, reasoning, ``forced`` and the other result
fields). The protocol settings (a :class:`ScoringConfig`) go with every call: as ``config=`` in process, as the
request's protocol fields for a server (whose context length is fixed when it starts). Judgments already in the
judgment cache (the model's, or the server's ``--cache``) come from it, marked ``cached``.

Async calls never block the event loop: an in-process call runs in a worker thread (``asyncio.to_thread``; calls
from many tasks share the model's continuous batch), a server call goes through ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.core.pairs import Pair, Passage
from rank1_local.core.reranker import Reranker, check_documents
from rank1_local.core.results import Rank1Result
from rank1_local.server.auth import API_KEY_ENV, check_api_key

RERANK_PATH = "/v1/rerank"
MAX_CONCURRENT_REQUESTS = 8  # queries sent to a server at once by ``judge_queries``


@dataclass(frozen=True)
class Judgment:
    """rank1's judgment of one document, from a model in this process or from a server."""

    index: int  # position of the document in the call's input
    score: float  # P(" true") / (P(" true") + P(" false"))
    reasoning: str  # the reasoning chain (text before </think>)
    forced: bool  # reasoning did not close within the budget: the answer was forced
    n_tokens: int  # tokens generated
    truncated: bool  # the passage was cut to fit the context
    too_long: bool  # the prompt did not fit the context: not run, score 0.5
    cached: bool  # served from the judgment cache

    @classmethod
    def from_result(cls, result: Rank1Result) -> Judgment:
        return cls(result.index, result.score, result.reasoning, result.forced, result.n_tokens, result.truncated,
                   result.too_long, result.cached)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Judgment:
        """One result of the server's answer to a ``return_reasoning`` request."""
        return cls(int(row["index"]), float(row["relevance_score"]), row["reasoning"], bool(row["forced"]),
                   int(row["n_tokens"]), bool(row["truncated"]), bool(row["too_long"]), bool(row["cached"]))

    def metadata(self) -> dict[str, Any]:
        """What the integrations put in a document's metadata."""
        return {"relevance_score": self.score, "reasoning": self.reasoning, "forced": self.forced,
                "n_tokens": self.n_tokens, "truncated": self.truncated, "too_long": self.too_long,
                "cached": self.cached}


def best_first(judgments: Sequence[Judgment], top_n: int | None = None) -> list[Judgment]:
    """Highest score first, ties in input order (as :meth:`Reranker.rerank` and the server), cut to ``top_n``."""
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise Rank1Error(f"top_n must be a positive integer or None, got {top_n!r}")
    ranked = sorted(judgments, key=lambda j: (-j.score, j.index))
    return ranked[:top_n] if top_n is not None else ranked


def is_url(model: Any) -> bool:
    return isinstance(model, str) and model.startswith(("http://", "https://"))


def request_fields(config: ScoringConfig | None) -> dict[str, Any]:
    """The protocol settings as a request's fields (the server's context length is fixed when it starts)."""
    if config is None:
        return {}
    fields: dict[str, Any] = {"max_think_tokens": config.max_think_tokens, "rethink_rounds": config.rethink_rounds,
                              "protocol": config.protocol, "truncate_passages": config.truncate_passages}
    if config.prompt_template is not None:
        fields["prompt"] = config.prompt_template
    return fields


def _document(passage: Passage) -> str | dict[str, str]:
    if isinstance(passage, str):
        return passage
    if isinstance(passage, Mapping) and isinstance(passage.get("text"), str):
        return {"text": passage["text"], **({"title": passage["title"]} if passage.get("title") else {})}
    raise Rank1Error(f"a document must be a string or {{'text', 'title'}}, got {type(passage).__name__}")


class Rank1Client:
    """rank1 judgments from a loaded reranker, a model file or a server URL (see the module's documentation).

    Args:
        model: a loaded :class:`Reranker`, a model path / hub id (a ``Rank1`` is loaded), or ``http(s)://`` URL.
        config: the protocol settings of every call (default: the model's or the server's own).
        api_key: the server's API key (default: ``$RANK1_LOCAL_API_KEY``); for a URL only.
        cache: a judgment cache (or its SQLite file) for a model loaded from a path.
        timeout: seconds to wait for a server's answer (reasoning takes a while).
        **model_settings: engine settings of a model loaded from a path (``parallel=``, ``threads=``,
            ``n_gpu_layers=``, ``gguf_type=`` …).
    """

    def __init__(self, model: Reranker | str | Path, *, config: ScoringConfig | None = None,
                 api_key: str | None = None, cache: Any = None, timeout: float = 600.0,
                 **model_settings: Any) -> None:
        if config is not None and not isinstance(config, ScoringConfig):
            raise Rank1Error(f"config must be a ScoringConfig, got {type(config).__name__}")
        self.config = config
        self.timeout = timeout
        self.url: str | None = None
        self.reranker: Reranker | None = None
        self._owns_reranker = False
        self._http: Any = None
        self._lock = threading.Lock()
        if isinstance(model, Reranker):
            if model_settings or cache is not None:
                raise Rank1Error("cache and engine settings are for a model loaded from a path; this reranker is "
                                 "loaded already")
            self.reranker = model
        elif is_url(model):
            if model_settings or cache is not None:
                raise Rank1Error(f"cache and engine settings belong to the server at {model}, not to its client "
                                 "(give them to `rank1-local serve`)")
            self.url = str(model).rstrip("/")
            self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
            if self.api_key:
                check_api_key(self.api_key)
            self._httpx = require("httpx", "client", "a rank1-local server client")
        elif isinstance(model, (str, Path)):
            from rank1_local.backends.llama.facade import Rank1

            self.reranker = Rank1(model, config, cache=cache, **model_settings)
            self._owns_reranker = True
        else:
            raise Rank1Error(f"model must be a Rank1 (or other Reranker), a model path or a server URL, got "
                             f"{type(model).__name__}")
        if api_key is not None and self.url is None:
            raise Rank1Error("api_key is for a server URL; this client runs the model in process")

    def __repr__(self) -> str:
        where = self.url or getattr(self.reranker, "model_path", type(self.reranker).__name__)
        return f"Rank1Client({where!s})"

    # --- one query -------------------------------------------------------------------------------------------------

    def judge(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None) -> list[Judgment]:
        """One judgment per document, in input order."""
        check_documents(documents)
        if not documents:
            return []
        if self.url is not None:
            return self._post(self._client(), self._body(query, documents, instruction))
        assert self.reranker is not None
        pairs = [Pair(query, d, instruction) for d in documents]
        return [Judgment.from_result(r) for r in self.reranker.score_pairs(pairs, config=self.config)]

    def rerank(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None,
               top_n: int | None = None) -> list[Judgment]:
        """The judgments best first, cut to ``top_n``."""
        best_first([], top_n)  # a bad top_n fails before anything is scored
        return best_first(self.judge(query, documents, instruction=instruction), top_n)

    async def ajudge(self, query: str, documents: Sequence[Passage], *,
                     instruction: str | None = None) -> list[Judgment]:
        """:meth:`judge` without blocking the event loop."""
        check_documents(documents)
        if not documents:
            return []
        if self.url is None:
            return await asyncio.to_thread(self.judge, query, documents, instruction=instruction)
        async with self._httpx.AsyncClient(timeout=self.timeout) as http:
            return await self._apost(http, self._body(query, documents, instruction))

    async def arerank(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None,
                      top_n: int | None = None) -> list[Judgment]:
        best_first([], top_n)
        return best_first(await self.ajudge(query, documents, instruction=instruction), top_n)

    # --- many queries (PyTerrier frames) ---------------------------------------------------------------------------

    def judge_queries(self, queries: Sequence[tuple[str, Sequence[Passage]]], *,
                      instruction: str | None = None) -> list[list[Judgment]]:
        """Judgments for several ``(query, documents)`` at once, each list in input order: in process as one call
        (all pairs share the continuous batch), to a server as concurrent requests."""
        if self.url is None:
            assert self.reranker is not None
            pairs = [Pair(q, d, instruction) for q, docs in queries for d in docs]
            results = self.reranker.score_pairs(pairs, config=self.config)
            out, start = [], 0
            for _, docs in queries:  # indexes point into each query's own documents
                out.append([dataclasses.replace(Judgment.from_result(r), index=i)
                            for i, r in enumerate(results[start:start + len(docs)])])
                start += len(docs)
            return out
        if len(queries) <= 1:
            return [self.judge(q, docs, instruction=instruction) for q, docs in queries]
        with ThreadPoolExecutor(min(MAX_CONCURRENT_REQUESTS, len(queries))) as pool:
            return list(pool.map(lambda qd: self.judge(qd[0], qd[1], instruction=instruction), queries))

    # --- HTTP --------------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                self._http = self._httpx.Client(timeout=self.timeout)
            return self._http

    def _body(self, query: str, documents: Sequence[Passage], instruction: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "documents": [_document(d) for d in documents],
                                "return_reasoning": True, **request_fields(self.config)}
        if instruction is not None:
            body["instruction"] = instruction
        return body

    def _post(self, http: Any, body: dict[str, Any]) -> list[Judgment]:
        try:
            response = http.post(self.url + RERANK_PATH, json=body, headers=self._headers())
        except self._httpx.HTTPError as exc:
            raise Rank1Error(f"cannot reach the rank1-local server at {self.url}: {exc}") from None
        return self._judgments(response, len(body["documents"]))

    async def _apost(self, http: Any, body: dict[str, Any]) -> list[Judgment]:
        try:
            response = await http.post(self.url + RERANK_PATH, json=body, headers=self._headers())
        except self._httpx.HTTPError as exc:
            raise Rank1Error(f"cannot reach the rank1-local server at {self.url}: {exc}") from None
        return self._judgments(response, len(body["documents"]))

    def _judgments(self, response: Any, n_documents: int) -> list[Judgment]:
        if response.status_code != 200:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            raise Rank1Error(f"the rank1-local server at {self.url} answered {response.status_code}: {message}")
        rows = response.json()["results"]
        judgments = sorted((Judgment.from_row(row) for row in rows), key=lambda j: j.index)
        if [j.index for j in judgments] != list(range(n_documents)):
            raise Rank1Error(f"the server at {self.url} answered {len(rows)} results for {n_documents} documents")
        return judgments

    # --- lifetime ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP connections, and the model if this client loaded it (a reranker passed in stays open)."""
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()
        if self._owns_reranker and self.reranker is not None:
            self.reranker.close()

    def __enter__(self) -> Rank1Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_client(model: Any, **settings: Any) -> Rank1Client:
    """``model`` if it is a :class:`Rank1Client` already (settings must then be empty), else a new client."""
    if isinstance(model, Rank1Client):
        given = {k: v for k, v in settings.items() if v is not None}
        if given:
            raise Rank1Error(f"{', '.join(sorted(given))}: give these to the Rank1Client, not next to it")
        return model
    return Rank1Client(model, **settings)
