"""The user-facing reranking API shared by every backend, in the shape of sentence-transformers'
CrossEncoder (``predict(pairs)``, ``rank(query, documents)``) plus ``rerank`` returning full results.

Protocol settings are per call, the way vLLM's ``LLM.generate`` takes ``sampling_params``: every method takes
``config=`` (a :class:`ScoringConfig`; default: the one the model was loaded with). The context length is fixed
when the model is loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, Passage
from rank1_local.core.results import Rank1Result


def check_top_k(top_k: int | None, name: str = "top_k") -> int | None:
    """``top_k`` when it is None (every result) or a count of at least 1; anything else is an error naming it
    (a negative count would silently drop results from the end, and 0 would return nothing)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise Rank1Error(f"{name} must be at least 1 (or left out for every result), got {top_k!r}")
    return top_k


def ranked(results: Sequence[Rank1Result], top_k: int | None = None) -> list[Rank1Result]:
    """Best first (ties: input order), cut to ``top_k``."""
    order = sorted(results, key=lambda r: (-r.score, r.index))
    return order[:top_k] if top_k is not None else order


class Reranker(ABC):
    """Implementations set ``config`` and provide :meth:`score_pairs`; everything else is built on it."""

    config: ScoringConfig

    @abstractmethod
    def score_pairs(self, pairs: Sequence[Pair | tuple], *, config: ScoringConfig | None = None,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        """Score pairs under ``config``; results come back in input order. ``on_result`` sees each as it
        finishes."""

    @property
    @abstractmethod
    def device(self) -> str:
        """Where and how the model runs, in words ("CPU", "GPU offload (24/24 layers)", "transformers cuda float16").
        (The *backend* is the library that runs it: llama.cpp, transformers or vLLM.)"""

    def score_settings(self, config: ScoringConfig | None = None) -> dict[str, Any]:
        """Everything that decides the scores besides the model file: the protocol settings, and the numeric
        precision where the backend chooses it (written in run headers; a resumed run must keep them)."""
        settings = (config or self.config).to_dict()
        dtype = getattr(self, "dtype", None)
        if dtype is not None:
            settings["dtype"] = dtype
        return settings

    def rerank(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None,
               top_k: int | None = None, config: ScoringConfig | None = None) -> list[Rank1Result]:
        """Score every document for ``query``; best first. ``result.index`` points into ``documents``."""
        check_top_k(top_k)
        return ranked(self.score_pairs([Pair(query, d, instruction) for d in documents], config=config), top_k)

    def predict(self, sentences: Sequence[Sequence[Any]], batch_size: int | None = None,
                show_progress_bar: bool = False, *, config: ScoringConfig | None = None, **_: Any) -> np.ndarray:
        """CrossEncoder/MTEB style: ``(query, passage)`` or ``(query, passage, instruction)`` -> scores."""
        return np.array([r.score for r in self.score_pairs(list(sentences), config=config)], dtype=np.float64)

    def rank(self, query: str, documents: Sequence[Passage], top_k: int | None = None,
             return_documents: bool = False, *, config: ScoringConfig | None = None,
             **_: Any) -> list[dict[str, Any]]:
        """CrossEncoder style: ``[{"corpus_id", "score"[, "text"]}]``, best first."""
        out = []
        for r in self.rerank(query, documents, top_k=top_k, config=config):
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
