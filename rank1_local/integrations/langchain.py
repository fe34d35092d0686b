"""rank1 as a LangChain document compressor (``pip install 'rank1-local[langchain]'``).

``Rank1Reranker`` is a ``langchain_core`` ``BaseDocumentCompressor``: the reranker slot of LangChain, filled by
``ContextualCompressionRetriever(base_compressor=..., base_retriever=...)`` (in ``langchain-classic`` since
LangChain 1.0). ``compress_documents`` returns the documents best first, cut to ``top_n``, each a copy with
``relevance_score``, ``reasoning`` and ``forced`` (and ``n_tokens``, ``truncated``, ``too_long``, ``cached``) added
to its metadata. ``acompress_documents`` does not block the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.extras import require
from rank1_local.core.reranker import Reranker
from rank1_local.integrations.client import Judgment, Rank1Client, as_client, best_first

_documents = require("langchain_core.documents", "langchain", "the LangChain integration")
_pydantic = require("pydantic", "langchain", "the LangChain integration")

Document = _documents.Document


def _ranked(documents: Sequence[Any], judgments: list[Judgment], top_n: int | None) -> list[Any]:
    out = []
    for j in best_first(judgments, top_n):
        doc = documents[j.index]
        out.append(Document(page_content=doc.page_content, metadata={**doc.metadata, **j.metadata()}, id=doc.id))
    return out


class Rank1Reranker(_documents.BaseDocumentCompressor):
    """Rerank LangChain documents with rank1.

    Args:
        model: a loaded ``Rank1`` (or other reranker), a model path, a ``rank1-local serve`` URL, or a
            :class:`~rank1_local.integrations.client.Rank1Client`.
        top_n: keep the best ``top_n`` documents (default: all, best first).
        instruction: appended to the query as the official code does.
        config: the protocol settings (:class:`ScoringConfig`) of every call.
        api_key: the server's API key (a URL only; default ``$RANK1_LOCAL_API_KEY``).
        cache: a judgment cache for a model loaded from a path.
        **model_settings: engine settings of a model loaded from a path (``parallel=``, ``threads=`` …).
    """

    model_config = _pydantic.ConfigDict(arbitrary_types_allowed=True)

    client: Rank1Client
    top_n: int | None = None
    instruction: str | None = None

    def __init__(self, model: Reranker | Rank1Client | str | Path, *, top_n: int | None = None,
                 instruction: str | None = None, config: ScoringConfig | None = None, api_key: str | None = None,
                 cache: Any = None, **model_settings: Any) -> None:
        best_first([], top_n)
        client = as_client(model, config=config, api_key=api_key, cache=cache, **model_settings)
        super().__init__(client=client, top_n=top_n, instruction=instruction)

    def compress_documents(self, documents: Sequence[Any], query: str, callbacks: Any = None) -> Sequence[Any]:
        """The documents best first, cut to ``top_n``, with rank1's judgment in their metadata."""
        judgments = self.client.judge(query, [d.page_content for d in documents], instruction=self.instruction)
        return _ranked(documents, judgments, self.top_n)

    async def acompress_documents(self, documents: Sequence[Any], query: str,
                                  callbacks: Any = None) -> Sequence[Any]:
        judgments = await self.client.ajudge(query, [d.page_content for d in documents],
                                             instruction=self.instruction)
        return _ranked(documents, judgments, self.top_n)

    def close(self) -> None:
        """Close the client (and the model, if it was loaded from a path here)."""
        self.client.close()
