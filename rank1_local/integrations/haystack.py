"""rank1 as a Haystack ranker component (``pip install 'rank1-local[haystack]'``).

``Rank1Ranker`` is a ``@component`` with ``run(query, documents, top_k=None) -> {"documents": [...]}`` (and
``run_async``), the shape of Haystack's own rankers: the documents come back best first, cut to ``top_k``, each a
copy with ``score`` set to rank1's score and ``reasoning``, ``forced`` (and ``n_tokens``, ``truncated``,
``too_long``, ``cached``) added to its ``meta``. A model given as a path is loaded in ``warm_up()`` (which ``run``
calls if the pipeline has not). A ranker made from a path or a server URL serializes with the pipeline
(``to_dict``/``from_dict``); one made from a loaded model cannot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.core.reranker import Reranker
from rank1_local.integrations.client import Judgment, Rank1Client, as_client, best_first

haystack = require("haystack", "haystack", "the Haystack integration")
Document = haystack.Document


def _documents_out(documents: list[Any], judgments: list[Judgment], top_k: int | None) -> dict[str, list[Any]]:
    out = []
    for j in best_first(judgments, top_k):
        doc = documents[j.index]
        meta = {k: v for k, v in j.metadata().items() if k != "relevance_score"}
        out.append(dataclasses.replace(doc, score=j.score, meta={**doc.meta, **meta}))
    return {"documents": out}


@haystack.component
class Rank1Ranker:
    """Rank Haystack documents with rank1.

    Args:
        model: a loaded ``Rank1`` (or other reranker), a model path, a ``rank1-local serve`` URL, or a
            :class:`~rank1_local.integrations.client.Rank1Client`.
        top_k: keep the best ``top_k`` documents (default: all, best first); ``run(top_k=...)`` overrides it.
        instruction: appended to the query as the official code does.
        config, api_key, cache, **model_settings: as for :class:`~rank1_local.integrations.client.Rank1Client`.
    """

    def __init__(self, model: Reranker | Rank1Client | str | Path, *, top_k: int | None = None,
                 instruction: str | None = None, config: ScoringConfig | None = None, api_key: str | None = None,
                 cache: str | Path | None = None, **model_settings: Any) -> None:
        best_first([], top_k)
        self.model, self.top_k, self.instruction = model, top_k, instruction
        self.config, self.api_key, self.cache, self.model_settings = config, api_key, cache, model_settings
        self.client: Rank1Client | None = None
        if isinstance(model, (Reranker, Rank1Client)) or isinstance(model, str) and model.startswith("http"):
            self.warm_up()  # nothing to load: a loaded model, or a server

    def warm_up(self) -> None:
        """Load the model (once)."""
        if self.client is None:
            self.client = as_client(self.model, config=self.config, api_key=self.api_key, cache=self.cache,
                                    **self.model_settings)

    def _query(self, query: str, documents: list[Any]) -> tuple[Rank1Client, list[str]]:
        self.warm_up()
        assert self.client is not None
        return self.client, [d.content or "" for d in documents]

    @haystack.component.output_types(documents=list[Document])
    def run(self, query: str, documents: list[Document], top_k: int | None = None) -> dict[str, list[Document]]:
        """``documents`` best first for ``query``, cut to ``top_k`` (default: the component's)."""
        top_k = self.top_k if top_k is None else top_k
        best_first([], top_k)
        if not documents:
            return {"documents": []}
        client, texts = self._query(query, documents)
        return _documents_out(documents, client.judge(query, texts, instruction=self.instruction), top_k)

    @haystack.component.output_types(documents=list[Document])
    async def run_async(self, query: str, documents: list[Document],
                        top_k: int | None = None) -> dict[str, list[Document]]:
        top_k = self.top_k if top_k is None else top_k
        best_first([], top_k)
        if not documents:
            return {"documents": []}
        client, texts = self._query(query, documents)
        judgments = await client.ajudge(query, texts, instruction=self.instruction)
        return _documents_out(documents, judgments, top_k)

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.model, (str, Path)):
            raise Rank1Error("a Rank1Ranker made from a loaded model cannot be serialized: give it a model path or "
                             "a server URL")
        return haystack.default_to_dict(
            self, model=str(self.model), top_k=self.top_k, instruction=self.instruction,
            config=self.config.to_dict() if self.config is not None else None,
            cache=str(self.cache) if self.cache is not None else None, **self.model_settings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rank1Ranker:
        params = data.get("init_parameters", {})
        if params.get("config") is not None:
            params["config"] = ScoringConfig(**params["config"])
        return haystack.default_from_dict(cls, data)

    def close(self) -> None:
        """Close the client (and the model, if it was loaded from a path here)."""
        if self.client is not None:
            self.client.close()
