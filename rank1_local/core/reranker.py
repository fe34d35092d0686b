"""The user-facing reranking API shared by every backend, in the shape of sentence-transformers 6's
CrossEncoder (``predict(pairs)``, ``rank(query, documents)``: the same parameters, checked against
sentence-transformers' own signatures in the tests) plus ``rerank`` returning full results.

Protocol settings are per call, the way vLLM's ``LLM.generate`` takes ``sampling_params``: every method takes
``config=`` (a :class:`ScoringConfig`; default: the one the model was loaded with). The context length is fixed
when the model is loaded.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rank1_local.core.cards import RANK1, ModelCard
from rank1_local.core.config import ScoringConfig
from rank1_local.core.engine import Lifecycle, ScoringEngine
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, Passage
from rank1_local.core.results import Rank1Result, RunStats


def check_top_k(top_k: int | None, name: str = "top_k") -> int | None:
    """``top_k`` when it is None (every result) or a count of at least 1; anything else is an error naming it
    (a negative count would silently drop results from the end, and 0 would return nothing)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise Rank1Error(f"{name} must be at least 1 (or left out for every result), got {top_k!r}")
    return top_k


def check_documents(documents: Any) -> Sequence[Passage]:
    """``documents`` when it is a sequence of passages; a single string (which would be scored letter by letter) or a
    single mapping is an error saying so, before anything is scored."""
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
        raise Rank1Error(f"documents must be a list of passages (strings, or {{'title', 'text'}} mappings), got "
                         f"{'one ' if isinstance(documents, (str, bytes, Mapping)) else ''}{type(documents).__name__}")
    return documents


PREFILTER_STAGE = "prefilter"  # a cascade's result scored by its prefilter only (rank1_local.pipeline.cascade)


def ranked(results: Sequence[Rank1Result], top_k: int | None = None) -> list[Rank1Result]:
    """Best first (ties: input order), cut to ``top_k``. In a cascade's results, those its reranker scored come
    first, then those below the cut in the prefilter's order."""
    order = sorted(results, key=lambda r: (r.stage == PREFILTER_STAGE, -r.score, r.index))
    return order[:top_k] if top_k is not None else order


class Reranker(ABC):
    """A loaded model behind the :class:`~rank1_local.core.engine.ScoringEngine` interface.

    Implementations set ``config`` (the default protocol settings), ``engine`` (the pipeline every call goes
    through), ``model_path`` and ``backend``, and free their own resources in :meth:`_close_backend`; scoring,
    closing and the sentence-transformers API are built here, the same for every backend."""

    config: ScoringConfig
    engine: ScoringEngine
    backend: str = ""  # the library that runs the model: "llama.cpp", "transformers", "vllm"
    model_path: Path
    card: ModelCard = RANK1  # the model's family: its prompt, answers and whether it reasons

    def __new__(cls, *args: Any, **kwargs: Any) -> Reranker:
        self = super().__new__(cls)
        self._lifecycle = Lifecycle.OPEN
        self._close_lock = threading.Lock()
        self.last_stats: RunStats | None = None  # the pairs decoded, tokens and time of the last call to finish
        return self

    def score_pairs(self, pairs: Sequence[Pair | tuple], *, config: ScoringConfig | None = None,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        """Score pairs under ``config`` (default: the model's); results come back in input order. ``on_result`` sees
        each as it finishes, in the calling thread (if it raises, the rest of the call is cancelled). Pairs with the
        same prompt are judged once. Thread-safe: concurrent calls share the engine."""
        self._check_open()
        ticket = self.engine.submit(pairs, config)
        results: dict[int, Rank1Result] = {}
        for result in ticket.results():
            results[result.index] = result
            if on_result is not None:
                on_result(result)
        self.last_stats = ticket.stats()
        return [results[i] for i in range(ticket.size)]

    @property
    @abstractmethod
    def device(self) -> str:
        """Where and how the model runs, in words ("CPU", "GPU offload (24/24 layers)", "transformers cuda float16").
        (The *backend* is the library that runs it: llama.cpp, transformers or vLLM.)"""

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle

    def _check_open(self) -> None:
        if self._lifecycle is not Lifecycle.OPEN:
            name = getattr(getattr(self, "model_path", None), "name", type(self).__name__)
            raise Rank1Error(f"{name}: the model was closed; load it again to keep using it")

    def score_settings(self, config: ScoringConfig | None = None) -> dict[str, Any]:
        """Everything that decides the scores besides the model file: the protocol settings, and the numeric
        precision where the backend chooses it (written in run headers; a resumed run must keep them)."""
        settings = (config or self.config).to_dict()
        dtype = getattr(self, "dtype", None)
        if dtype is not None:
            settings["dtype"] = dtype
        if self.card is not RANK1:  # rank1's settings read as they always have
            settings["card"] = self.card.name
        return settings

    def rerank(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None,
               top_k: int | None = None, config: ScoringConfig | None = None) -> list[Rank1Result]:
        """Score every document for ``query``; best first. ``result.index`` points into ``documents``."""
        check_top_k(top_k)
        check_documents(documents)
        return ranked(self.score_pairs([Pair(query, d, instruction) for d in documents], config=config), top_k)

    def predict(self, inputs: Sequence[Any] | Pair, prompt_name: str | None = None, prompt: str | None = None,
                batch_size: int = 32, show_progress_bar: bool | None = None, activation_fn: Callable | None = None,
                apply_softmax: bool | None = False, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
                device: str | list[str] | None = None, pool: dict[str, Any] | None = None,
                chunk_size: int | None = None, *, config: ScoringConfig | None = None, **kwargs: Any) -> Any:
        """sentence-transformers' ``CrossEncoder.predict``, same parameters: ``(query, passage)`` or
        ``(query, passage, instruction)`` pairs (or :class:`Pair`) -> scores, a float64 array. One pair alone
        (``predict(("q", "p"))``) gives one numpy scalar, as sentence-transformers does.

        ``batch_size``, ``apply_softmax``, ``chunk_size`` and other keywords change nothing here (pairs share the
        model's continuous batch; a score is already a probability); ``show_progress_bar`` shows one;
        ``convert_to_tensor`` gives a torch tensor, ``convert_to_numpy=False`` a list of floats. What rank1 cannot
        honour is refused: a sentence-transformers ``prompt``/``prompt_name`` (give the dataset prompt as
        ``config=ScoringConfig(prompt_template=...)``), ``activation_fn``, ``device`` and ``pool`` (chosen at load).
        """
        refuse_unsupported("predict", prompt_name=prompt_name, prompt=prompt, activation_fn=activation_fn,
                           device=device, pool=pool)
        if batch_size <= 0:
            raise Rank1Error(f"batch_size must be a positive integer, got {batch_size}")
        single = is_single_pair(inputs)
        if isinstance(inputs, np.ndarray):  # a 1-D string array is one pair, a 2-D one a batch
            inputs = inputs.tolist()
        pairs = [inputs] if single else list(inputs)
        results = self._score_with_progress(pairs, config, bool(show_progress_bar))
        scores = np.array([r.score for r in results], dtype=np.float64)
        out: Any
        if convert_to_tensor:
            from rank1_local.core.extras import require

            out = require("torch", "reference", "predict(convert_to_tensor=True)").from_numpy(scores)
        elif convert_to_numpy:
            out = scores
        else:
            out = scores.tolist()
        return out[0] if single else out

    def rank(self, query: str, documents: Sequence[Passage], top_k: int | None = None,
             return_documents: bool = False, prompt_name: str | None = None, prompt: str | None = None,
             batch_size: int = 32, show_progress_bar: bool | None = None, activation_fn: Callable | None = None,
             device: str | list[str] | None = None, pool: dict[str, Any] | None = None,
             chunk_size: int | None = None, *, config: ScoringConfig | None = None) -> list[dict[str, Any]]:
        """sentence-transformers' ``CrossEncoder.rank``, same parameters and answer: ``[{"corpus_id", "score"[,
        "text"]}]``, best first (ties in input order), cut to ``top_k``. Parameters as in :meth:`predict`."""
        refuse_unsupported("rank", prompt_name=prompt_name, prompt=prompt, activation_fn=activation_fn,
                           device=device, pool=pool)
        check_top_k(top_k)
        check_documents(documents)
        if batch_size <= 0:
            raise Rank1Error(f"batch_size must be a positive integer, got {batch_size}")
        results = self._score_with_progress([Pair(query, d) for d in documents], config, bool(show_progress_bar))
        out = []
        for r in ranked(results, top_k):
            row: dict[str, Any] = {"corpus_id": r.index, "score": r.score}
            if return_documents:
                row["text"] = documents[r.index]
            out.append(row)
        return out

    def _score_with_progress(self, pairs: Sequence[Pair | tuple], config: ScoringConfig | None,
                             progress: bool) -> list[Rank1Result]:
        if not progress:
            return self.score_pairs(pairs, config=config)
        from tqdm.auto import tqdm

        with tqdm(total=len(pairs), desc="rank1", unit="pair") as bar:
            return self.score_pairs(pairs, config=config, on_result=lambda _: bar.update())

    def close(self) -> None:
        """Stop taking calls, cancel those in flight (each caller gets an error at once), then free the backend's
        resources (its owner thread stops first, then what it owned is freed). Safe from any thread, and more than
        once."""
        with self._close_lock:
            if self._lifecycle is not Lifecycle.OPEN:
                return
            self._lifecycle = Lifecycle.DRAINING
        try:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop(0.0, "the model was closed before this call finished")
        finally:
            try:
                self._close_backend()
            finally:
                self._lifecycle = Lifecycle.CLOSED

    @abstractmethod
    def _close_backend(self) -> None:
        """Free what the backend holds (its owner thread, model, tokenizer, cache), in the reverse order of opening."""

    def __enter__(self) -> Reranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort, as llama-cpp-python's Llama does
        if getattr(self, "_lifecycle", None) is Lifecycle.OPEN and hasattr(self, "engine"):
            try:
                self.close()
            except Exception:
                pass


def is_single_pair(inputs: Any) -> bool:
    """Whether ``predict`` was given one pair rather than a list of them: a :class:`Pair`, or a tuple/list whose
    first item is the query string (sentence-transformers' rule, where a batch holds lists or tuples)."""
    if isinstance(inputs, Pair):
        return True
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in ("U", "O"):
        return inputs.size > 0 and inputs.ndim < 2
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and isinstance(inputs[0], str)


def refuse_unsupported(method: str, **given: Any) -> None:
    """sentence-transformers options rank1 cannot honour: an error naming them, never silently ignored."""
    why = {"prompt_name": "give the dataset prompt as config=ScoringConfig(prompt_template=...)",
           "prompt": "give the dataset prompt as config=ScoringConfig(prompt_template=...)",
           "activation_fn": "rank1's score is already a probability, P(true) / (P(true) + P(false))",
           "device": "the device is chosen when the model is loaded",
           "pool": "pairs share the model's continuous batch; load it with parallel=N for more slots"}
    for name, value in given.items():
        if value is not None:
            raise Rank1Error(f"{method}({name}=...) is not supported by rank1: {why[name]}")
