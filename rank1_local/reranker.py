"""``Rank1``: rerank passages with a rank1 GGUF model through llama.cpp.

The API follows sentence-transformers' CrossEncoder (``predict(pairs)``, ``rank(query, docs)``);
``rerank`` returns full :class:`Rank1Result` objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from rank1_local.engine import EngineConfig, LlamaEngine
from rank1_local.errors import Rank1Error, UnsupportedModelError
from rank1_local.model_files import resolve_gguf
from rank1_local.prompt import build_prompt, format_passage, format_query, prompt_prefix
from rank1_local.protocol import answer_token_ids
from rank1_local.results import Rank1Result, RunStats
from rank1_local.scheduler import Job, Scheduler, SchedulerParams

logger = logging.getLogger(__name__)

Passage = Union[str, Mapping[str, str]]
FALLBACK_MARGIN = 24  # room for "\n" + cut text re-tokenized + "\n</think>" beyond the budget


@dataclass(frozen=True)
class Pair:
    """One (query, passage[, instruction]) to score."""

    query: str
    passage: Passage
    instruction: str | None = None


def _check_text(what: str, text: Any) -> str:
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
    if not text.strip():
        raise Rank1Error(f"{what} is empty")
    return text


class Rank1:
    """A rank1 reranker running a GGUF model in llama.cpp.

    Args:
        model: path to a .gguf file, or a hub id (see :func:`rank1_local.model_files.resolve_gguf`).
        n_gpu_layers: layers to offload (0 = CPU only, -1 = all).
        parallel: pairs decoded together (continuous batching).
        max_think_tokens: reasoning budget per pair; past it the answer is forced (official: 8192).
        n_ctx: context per pair (prompt + reasoning); passages are truncated to fit.
        rethink_rounds: budget forcing: replace ``</think>`` with ``\\nWait`` this many times.
        prompt_template: dataset prompt containing ``FILL_QUERY_HERE``, applied to every query.
    """

    def __init__(self, model: str | Path, *, n_gpu_layers: int = 0, parallel: int = 4,
                 max_think_tokens: int = 1024, n_ctx: int = 4096, threads: int | None = None,
                 rethink_rounds: int = 0, prompt_template: str | None = None, n_batch: int = 512,
                 f32_kv_cache: bool = False, gguf_type: str | None = None) -> None:
        if parallel < 1:
            raise Rank1Error("parallel must be at least 1")
        if not 1 <= max_think_tokens <= 8192 * 4:
            raise Rank1Error("max_think_tokens must be between 1 and 32768 (official budget: 8192)")
        if prompt_template is not None:
            format_query("q", template=prompt_template)  # validates the placeholder
        self.model_path = resolve_gguf(model, gguf_type=gguf_type)
        self.max_think_tokens = max_think_tokens
        self.rethink_rounds = rethink_rounds
        self.prompt_template = prompt_template
        self.parallel = parallel
        self.n_ctx = n_ctx
        self.engine = LlamaEngine(self.model_path, EngineConfig(
            n_ctx=n_ctx * (parallel + 1), n_seq_max=parallel + 1, n_batch=n_batch, n_threads=threads,
            n_gpu_layers=n_gpu_layers, f32_kv_cache=f32_kv_cache))
        self.true_id, self.false_id = self._answer_ids()
        self.last_stats: RunStats | None = None
        logger.info("loaded %s on %s", self.model_path.name, self.engine.backend.description)

    @property
    def backend(self) -> str:
        return self.engine.backend.description

    def _answer_ids(self) -> tuple[int, int]:
        try:
            return answer_token_ids(self.engine.tokenize)
        except UnsupportedModelError as exc:
            self.engine.close()
            raise UnsupportedModelError(f"{self.model_path.name}: {exc}") from None

    # --- building jobs --------------------------------------------------------------------------
    def _fit(self, query: str, passage: str) -> tuple[str, list[int], int]:
        """The prompt (passage cut if needed), its ids, and how many passage tokens were dropped."""
        limit = self.n_ctx - self.max_think_tokens - FALLBACK_MARGIN
        prompt = build_prompt(query, passage)
        ids = self.engine.tokenize(prompt)
        if len(ids) <= limit:
            return prompt, ids, 0
        bos = len(self.engine.tokenize(""))
        passage_ids = self.engine.tokenize(passage)[bos:]
        keep = len(passage_ids) - (len(ids) - limit)
        while keep > 0:
            cut = b"".join(self.engine.piece(t) for t in passage_ids[:keep]).decode("utf-8", "ignore")
            prompt = build_prompt(query, cut)
            ids = self.engine.tokenize(prompt)
            if len(ids) <= limit:
                return prompt, ids, len(passage_ids) - keep
            keep -= max(1, len(ids) - limit)
        raise Rank1Error(f"the query (with its instruction/template) leaves no room for a passage in a context of "
                         f"{self.n_ctx} tokens with a {self.max_think_tokens}-token reasoning budget; "
                         "raise n_ctx or lower max_think_tokens")

    def _jobs(self, pairs: Sequence[Pair]) -> list[Job]:
        by_query: dict[str, list[int]] = {}
        prompts: list[tuple[str, list[int], int]] = []
        queries: list[str] = []
        for i, pair in enumerate(pairs):
            query = _check_text(f"query of pair {i}", pair.query)
            passage = format_passage(pair.passage) if isinstance(pair.passage, Mapping) else pair.passage
            passage = _check_text(f"passage of pair {i}", passage)
            instruction = _check_text(f"instruction of pair {i}", pair.instruction) if pair.instruction else None
            q = format_query(query, instruction, self.prompt_template)
            queries.append(q)
            prompts.append(self._fit(q, passage))
        prefixes: dict[str, list[int]] = {}
        bos = len(self.engine.tokenize(""))
        for q in dict.fromkeys(queries):
            ids = self.engine.tokenize(prompt_prefix(q))
            # the prefix's last token may merge with the passage's first one: never share it
            prefixes[q] = ids[:max(bos, len(ids) - 1)]
        jobs = []
        for i, (q, (prompt, ids, dropped)) in enumerate(zip(queries, prompts)):
            prefix_ids = prefixes[q]
            n = min(len(prefix_ids), len(ids) - 1) if ids[:len(prefix_ids)] == prefix_ids else 0
            jobs.append(Job(i, prompt, ids, n, dropped > 0, dropped))
            by_query.setdefault(q, []).append(i)
        # keep each query's passages together so its prefix is evaluated once
        order = [i for idx in by_query.values() for i in idx]
        return [jobs[i] for i in order]

    # --- scoring ----------------------------------------------------------------------------------
    def score_pairs(self, pairs: Sequence[Pair | tuple], *,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        """Score pairs; results come back in input order. ``on_result`` sees each as it finishes."""
        norm = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
        if not norm:
            return []
        jobs = self._jobs(norm)
        scheduler = Scheduler(self.engine, SchedulerParams(self.parallel, self.max_think_tokens, self.rethink_rounds,
                                                           self.true_id, self.false_id))
        results, self.last_stats = scheduler.run(jobs, on_result=on_result)
        return results

    def rerank(self, query: str, documents: Sequence[Passage], *, instruction: str | None = None,
               top_k: int | None = None) -> list[Rank1Result]:
        """Score every document for ``query``; best first. ``result.index`` points into ``documents``."""
        results = self.score_pairs([Pair(query, d, instruction) for d in documents])
        ranked = sorted(results, key=lambda r: (-r.score, r.index))
        return ranked[:top_k] if top_k is not None else ranked

    def predict(self, sentences: Sequence[Sequence[Any]], batch_size: int | None = None,
                show_progress_bar: bool = False, **_: Any) -> np.ndarray:
        """CrossEncoder/MTEB style: ``(query, passage)`` or ``(query, passage, instruction)`` -> scores."""
        pairs = []
        for i, item in enumerate(sentences):
            if len(item) not in (2, 3):
                raise Rank1Error(f"pair {i} must be (query, passage) or (query, passage, instruction)")
            pairs.append(Pair(*item))
        return np.array([r.score for r in self.score_pairs(pairs)], dtype=np.float32)

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
        self.engine.close()

    def __enter__(self) -> Rank1:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
