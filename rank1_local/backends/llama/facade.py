"""``Rank1``: rerank passages with a rank1 GGUF model through llama.cpp (CPU, CUDA or Metal).

The API follows sentence-transformers' CrossEncoder (``predict(pairs)``, ``rank(query, docs)``);
``rerank`` returns full :class:`Rank1Result` objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rank1_local.core.reranker import Reranker
from rank1_local.backends.llama.engine import EngineConfig, LlamaEngine
from rank1_local.backends.llama.scheduler import Scheduler, SchedulerParams, make_jobs
from rank1_local.core.config import ScoringConfig, split_settings
from rank1_local.core.duplicates import score_each_prompt_once
from rank1_local.core.errors import Rank1Error, UnsupportedModelError
from rank1_local.cache.store import CacheScope, JudgmentCache, score_with_cache
from rank1_local.models.model_files import resolve_gguf
from rank1_local.core.pairs import Pair, PreparedPair, prepare_pairs
from rank1_local.core.protocol import answer_token_ids
from rank1_local.core.results import Rank1Result, RunStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaSettings:
    """Engine settings of the llama.cpp backend: they change speed and memory, never scores.

    Args:
        n_gpu_layers: layers to offload (0 = CPU only, -1 = all).
        parallel: pairs decoded together (continuous batching).
        threads: CPU threads (default: all cores).
        n_batch: tokens per ``llama_decode`` call.
        f32_kv_cache: keep the KV cache in float32 instead of float16.
    """

    n_gpu_layers: int = 0
    parallel: int = 4
    threads: int | None = None
    n_batch: int = 512
    f32_kv_cache: bool = False

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise Rank1Error(f"parallel must be at least 1, got {self.parallel}")
        if self.threads is not None and self.threads < 1:
            raise Rank1Error(f"threads must be at least 1, got {self.threads}")
        if self.n_batch < 1:
            raise Rank1Error(f"n_batch must be at least 1, got {self.n_batch}")
        if self.n_gpu_layers < -1:
            raise Rank1Error(f"n_gpu_layers must be -1 (all), 0 (CPU) or a layer count, got {self.n_gpu_layers}")


class Rank1(Reranker):
    """A rank1 reranker running a GGUF model in llama.cpp.

    Args:
        model: path to a .gguf file, or a hub id with a published GGUF
            (see :func:`rank1_local.models.model_files.resolve_gguf`).
        config: the protocol settings (:class:`ScoringConfig`); keyword arguments of the same names
            (``max_think_tokens=…``) build one.
        settings: engine settings (:class:`LlamaSettings`); keyword arguments of the same names build one.
        gguf_type: the GGUF type to fetch for a hub id.
        cache: a judgment cache (:class:`~rank1_local.cache.store.JudgmentCache`, or the path of its SQLite
            file): pairs already judged by this model file under the same settings are served from it.
    """

    def __init__(self, model: str | Path, config: ScoringConfig | None = None,
                 settings: LlamaSettings | None = None, *, gguf_type: str | None = None,
                 cache: str | Path | JudgmentCache | None = None, **kwargs: object) -> None:
        config, settings = split_settings("Rank1", config, settings, LlamaSettings, kwargs)
        self.config = config
        self.settings = settings
        self.model_path = resolve_gguf(model, gguf_type=gguf_type)
        self.engine = LlamaEngine(self.model_path, EngineConfig(
            n_ctx=(config.n_ctx + 1) * (settings.parallel + 1), n_seq_max=settings.parallel + 1, n_batch=settings.n_batch,
            n_threads=settings.threads, n_gpu_layers=settings.n_gpu_layers, f32_kv_cache=settings.f32_kv_cache))
        try:
            self.true_id, self.false_id = answer_token_ids(self.engine.tokenize)
        except UnsupportedModelError as exc:
            self.engine.close()
            raise UnsupportedModelError(f"{self.model_path.name}: {exc}") from None
        self.last_stats: RunStats | None = None
        self.cache = cache if cache is None or isinstance(cache, JudgmentCache) else JudgmentCache(cache)
        self._scopes: dict[ScoringConfig, CacheScope] = {}  # shared with with_config clones, keyed by config
        logger.info("loaded %s on %s", self.model_path.name, self.engine.backend.description)

    @property
    def backend(self) -> str:
        return self.engine.backend.description

    def cache_settings(self) -> dict[str, Any]:
        """What the judgment cache keys on besides the model file and the prompt: the protocol settings and the
        engine facts that can change greedy decoding's numerics (where it runs, the KV cache type, the versions
        of llama.cpp and of rank1-local)."""
        from rank1_local.version import __version__

        try:
            llama_cpp_version = metadata.version("llama-cpp-python")
        except metadata.PackageNotFoundError:
            llama_cpp_version = "unknown"
        return {**self.score_settings(), "engine": {
            "backend": self.engine.backend.description, "f32_kv_cache": self.settings.f32_kv_cache,
            "llama_cpp": llama_cpp_version, "rank1_local": __version__}}

    def cache_scope(self) -> CacheScope | None:
        """The judgment cache's scope for this model and the current config (None without a cache)."""
        if self.cache is None:
            return None
        scope = self._scopes.get(self.config)
        if scope is None:
            scope = self._scopes[self.config] = self.cache.scope(self.model_path, self.cache_settings())
        return scope

    def score_pairs(self, pairs: Sequence[Pair | tuple], *,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        """Score pairs; results come back in input order. ``on_result`` sees each as it finishes. Pairs with the
        same prompt are judged once. With a judgment cache, pairs already judged come from it. ``last_stats``
        counts only the pairs decoded."""
        prepared = prepare_pairs(pairs, self.config, self.engine.tokenize, self.engine.detokenize)
        if not prepared:
            return []
        self.last_stats = RunStats(0, 0, 0, 0.0)

        def run(todo: list[PreparedPair], on_done: Callable[[Rank1Result], None] | None) -> list[Rank1Result]:
            scheduler = Scheduler(self.engine, SchedulerParams(self.settings.parallel, self.config, self.true_id,
                                                               self.false_id))
            results, self.last_stats = scheduler.run(make_jobs(todo, self.engine.tokenize), on_result=on_done)
            return results

        scope = self.cache_scope()
        return score_each_prompt_once(prepared, lambda todo, on_done: score_with_cache(todo, scope, run, on_done),
                                      on_result)

    def close(self) -> None:
        self.engine.close()
        if self.cache is not None:  # writes its pending hit counts; a shared cache opens again when next used
            self.cache.close()

