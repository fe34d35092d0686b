"""rank1 as a LlamaIndex node postprocessor (``pip install 'rank1-local[llama-index]'``).

``Rank1Rerank`` is a ``llama_index.core`` ``BaseNodePostprocessor``: give it to a query engine
(``index.as_query_engine(node_postprocessors=[Rank1Rerank(...)])``) or call ``postprocess_nodes`` yourself. The
nodes come back best first, cut to ``top_n``, with rank1's score on ``NodeWithScore.score`` and ``reasoning``,
``forced`` (and ``n_tokens``, ``truncated``, ``too_long``, ``cached``) in a copy of each node's metadata; those keys
are kept out of the text that is embedded (the LLM sees them, as it sees the rest of the metadata, unless
``reasoning_to_llm=False``). ``apostprocess_nodes`` does not block the event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.extras import require
from rank1_local.core.reranker import Reranker
from rank1_local.integrations.client import Judgment, Rank1Client, as_client, best_first

_types = require("llama_index.core.postprocessor.types", "llama-index", "the LlamaIndex integration")
_schema = require("llama_index.core.schema", "llama-index", "the LlamaIndex integration")
_pydantic = require("pydantic", "llama-index", "the LlamaIndex integration")

META_KEYS = ("relevance_score", "reasoning", "forced", "n_tokens", "truncated", "too_long", "cached")


class Rank1Rerank(_types.BaseNodePostprocessor):
    """Rerank LlamaIndex nodes with rank1.

    Args:
        model: a loaded ``Rank1`` (or other reranker), a model path, a ``rank1-local serve`` URL, or a
            :class:`~rank1_local.integrations.client.Rank1Client`.
        top_n: keep the best ``top_n`` nodes (default: all, best first).
        instruction: appended to the query as the official code does.
        keep_retrieval_score: keep the retriever's score in the metadata as ``retrieval_score``.
        reasoning_to_llm: let the LLM see rank1's metadata with the node's text (default True).
        config, api_key, cache, **model_settings: as for :class:`~rank1_local.integrations.client.Rank1Client`.
    """

    model_config = _pydantic.ConfigDict(arbitrary_types_allowed=True)

    client: Rank1Client
    top_n: int | None = None
    instruction: str | None = None
    keep_retrieval_score: bool = False
    reasoning_to_llm: bool = True

    def __init__(self, model: Reranker | Rank1Client | str | Path, *, top_n: int | None = None,
                 instruction: str | None = None, keep_retrieval_score: bool = False, reasoning_to_llm: bool = True,
                 config: ScoringConfig | None = None, api_key: str | None = None, cache: Any = None,
                 **model_settings: Any) -> None:
        best_first([], top_n)
        client = as_client(model, config=config, api_key=api_key, cache=cache, **model_settings)
        super().__init__(client=client, top_n=top_n, instruction=instruction,
                         keep_retrieval_score=keep_retrieval_score, reasoning_to_llm=reasoning_to_llm)

    @classmethod
    def class_name(cls) -> str:
        return "Rank1Rerank"

    def _inputs(self, nodes: list[Any], query_bundle: Any) -> tuple[str, list[str]]:
        if query_bundle is None:
            raise ValueError("Rank1Rerank needs the query: postprocess_nodes(nodes, query_str=...)")
        return query_bundle.query_str, [n.node.get_content(metadata_mode=_schema.MetadataMode.NONE) for n in nodes]

    def _ranked(self, nodes: list[Any], judgments: list[Judgment]) -> list[Any]:
        out = []
        for j in best_first(judgments, self.top_n):
            original = nodes[j.index]
            node = original.node.model_copy()
            node.metadata = {**original.node.metadata, **j.metadata()}
            if self.keep_retrieval_score:
                node.metadata["retrieval_score"] = original.score
            node.excluded_embed_metadata_keys = [*original.node.excluded_embed_metadata_keys,
                                                 *(k for k in META_KEYS if k not in
                                                   original.node.excluded_embed_metadata_keys)]
            if not self.reasoning_to_llm:
                node.excluded_llm_metadata_keys = [*original.node.excluded_llm_metadata_keys,
                                                   *(k for k in META_KEYS if k not in
                                                     original.node.excluded_llm_metadata_keys)]
            out.append(_schema.NodeWithScore(node=node, score=j.score))
        return out

    def _postprocess_nodes(self, nodes: list[Any], query_bundle: Any = None) -> list[Any]:
        if not nodes:
            return []
        query, texts = self._inputs(nodes, query_bundle)
        return self._ranked(nodes, self.client.judge(query, texts, instruction=self.instruction))

    async def _apostprocess_nodes(self, nodes: list[Any], query_bundle: Any = None) -> list[Any]:
        if not nodes:
            return []
        query, texts = self._inputs(nodes, query_bundle)
        return self._ranked(nodes, await self.client.ajudge(query, texts, instruction=self.instruction))

    def close(self) -> None:
        """Close the client (and the model, if it was loaded from a path here)."""
        self.client.close()
