"""The user-facing reranking API shared by every backend, in the shape of sentence-transformers'
CrossEncoder (``predict(pairs)``, ``rank(query, documents)``) plus ``rerank`` returning full results."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, Passage
from rank1_local.core.results import Rank1Result


class Reranker(ABC):
    """Implementations set ``config`` and provide :meth:`score_pairs`; everything else is built on it."""

    config: ScoringConfig

    @abstractmethod
    def score_pairs(self, pairs: Sequence[Pair | tuple], *,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        """Score pairs; results come back in input order. ``on_result`` sees each as it finishes."""

    @property
    @abstractmethod
    def backend(self) -> str:
        """Where the model runs, in words (e.g. "CPU", "GPU offload (24/24 layers)", "transformers cuda float16")."""

    def with_config(self, config: ScoringConfig) -> Reranker:
        """This reranker under other protocol settings (budget, dataset prompt …), sharing the loaded model; the
        context length is fixed when the model is loaded. Closing either closes the shared model."""
        if config.n_ctx != self.config.n_ctx:
            raise Rank1Error(f"n_ctx is fixed when the model is loaded ({self.config.n_ctx}); load it again for "
                             f"{config.n_ctx}")
        self.check_config(config)
        clone = copy.copy(self)
        clone.config = config
        return clone

    def check_config(self, config: ScoringConfig) -> None:
        """Refuse settings this backend cannot honour (the default: all are fine)."""

    def score_settings(self) -> dict[str, Any]:
        """Everything that decides the scores besides the model file: the protocol settings, and the numeric
        precision where the backend chooses it (written in run headers; a resumed run must keep them)."""
        settings = self.config.to_dict()
        dtype = getattr(self, "dtype", None)
        if dtype is not None:
            settings["dtype"] = dtype
        return settings

    def rerank(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None,
               top_k: int | None = None) -> list[Rank1Result]:
        """Score every document for ``query``; best first. ``result.index`` points into ``documents``."""
        results = self.score_pairs([Pair(query, d, instruction) for d in documents])
        ranked = sorted(results, key=lambda r: (-r.score, r.index))
        return ranked[:top_k] if top_k is not None else ranked

    def predict(self, sentences: Sequence[Sequence[Any]], batch_size: int | None = None,
                show_progress_bar: bool = False, **_: Any) -> np.ndarray:
        """CrossEncoder/MTEB style: ``(query, passage)`` or ``(query, passage, instruction)`` -> scores."""
        return np.array([r.score for r in self.score_pairs(list(sentences))], dtype=np.float64)

    def rank(self, query: str, documents: Sequence[Passage], top_k: int | None = None,
             return_documents: bool = False, **_: Any) -> list[dict[str, Any]]:
        """CrossEncoder style: ``[{"corpus_id", "score"[, "text"]}]``, best first."""
        out = []
        for r in self.rerank(query, documents, top_k=top_k):
            row: dict[str, Any] = {"corpus_id": r.index, "score": r.score}
            if return_documents:
                row["text"] = documents[r.index]
            out.append(row)
        return out

    def close(self) -> None:
        """Free the model."""

    def __enter__(self) -> Reranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
