"""rank1 in MTEB: a cross-encoder for mteb 2.x (``CrossEncoderProtocol``) that also takes mteb 1.x's tuple form.

- mteb 2.x calls ``predict(queries, documents, *, task_metadata, hf_split, hf_subset, ...)`` with two DataLoaders
  of batched dicts; pair ``k`` is row ``k`` of each. Queries carry ``query`` (the query alone), ``instruction``
  when the task has one, and ``text`` (query and instruction joined); documents carry ``text``, which mteb builds
  as ``(title + " " + text).strip()`` — the string mteb 1.x handed the official wrapper.
- mteb 1.x (the official code's) calls ``predict([(query, passage[, instruction]), ...])``.

The official dataset prompt is chosen from the task's name and subset, as the official ``run_mteb.py`` does
(:func:`rank1_local.core.dataset_prompts.dataset_prompt`); the instruction is appended to the query as the official
``predict`` does. mteb is imported only when ``mteb_model_meta`` is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rank1_local.core.config import ScoringConfig
from rank1_local.core.dataset_prompts import dataset_prompt
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair
from rank1_local.core.reranker import Reranker

logger = logging.getLogger(__name__)


def _rows(batches: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Batched dicts (column -> list) as one dict per row."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        columns = {k: v for k, v in batch.items() if isinstance(v, (list, tuple))}
        n = len(next(iter(columns.values()))) if columns else 0
        rows += [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return rows


def pairs_from_batches(queries: Iterable[Mapping[str, Any]], documents: Iterable[Mapping[str, Any]]) -> list[Pair]:
    """mteb 2.x's two loaders as (query, passage, instruction) pairs, row by row."""
    q_rows, d_rows = _rows(queries), _rows(documents)
    if len(q_rows) != len(d_rows):
        raise Rank1Error(f"mteb gave {len(q_rows)} queries but {len(d_rows)} documents; they are scored in pairs")
    pairs = []
    for q, d in zip(q_rows, d_rows, strict=True):
        query = q.get("query", q.get("text"))
        instruction = q.get("instruction") if "query" in q else None
        pairs.append(Pair(query, d.get("text", ""), instruction))
    return pairs


class MTEBRank1:
    """A :class:`Reranker` as an MTEB cross-encoder.

    Args:
        reranker: any backend (llama.cpp, transformers, vLLM).
        dataset_prompts: apply the official dataset prompt of the task being evaluated (default True).
        name, revision: what MTEB records as the model.
    """

    def __init__(self, reranker: Reranker, *, dataset_prompts: bool = True, name: str = "jhu-clsp/rank1",
                 revision: str | None = None) -> None:
        self.reranker = reranker
        self.dataset_prompts = dataset_prompts
        self.name, self.revision = name, revision
        self._meta: Any = None

    def _config_for(self, task_metadata: Any, hf_subset: str | None) -> ScoringConfig | None:
        """The reranker's settings with the task's official dataset prompt (None: the reranker's own)."""
        if not self.dataset_prompts or task_metadata is None:
            return None
        template = dataset_prompt(task_metadata.name, hf_subset)
        if template is None:
            return None
        return dataclasses.replace(self.reranker.config, prompt_template=template)

    def predict(self, inputs1: Any, inputs2: Any = None, *, task_metadata: Any = None, hf_split: str | None = None,
                hf_subset: str | None = None, prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """Scores (float64), one per pair: mteb 2.x loaders, or mteb 1.x's list of tuples (``inputs2`` None)."""
        if inputs2 is None:
            return self.reranker.predict(list(inputs1))
        pairs = pairs_from_batches(inputs1, inputs2)
        config = self._config_for(task_metadata, hf_subset)
        logger.info("%s/%s: %d pairs%s", getattr(task_metadata, "name", "?"), hf_subset, len(pairs),
                    " with the official dataset prompt" if config is not None else "")
        return np.array([r.score for r in self.reranker.score_pairs(pairs, config=config)], dtype=np.float64)

    @property
    def mteb_model_meta(self) -> Any:
        """What MTEB records about the model (mteb's ``ModelMeta``)."""
        if self._meta is None:
            from rank1_local.core.extras import require

            model_meta = require("mteb.models.model_meta", "mteb", "the MTEB adapter")
            self._meta = model_meta.ModelMeta.create_empty(overwrites={
                "name": self.name, "revision": self.revision or "local", "languages": ["eng-Latn"],
                "max_tokens": self.reranker.config.n_ctx, "open_weights": True, "use_instructions": True,
                "reference": "https://arxiv.org/abs/2502.18418", "model_type": ["cross-encoder"]})
        return self._meta
