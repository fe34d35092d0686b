"""``Rank1``: rerank passages with a rank1 GGUF model through llama.cpp (CPU, CUDA or Metal).

The API follows sentence-transformers' CrossEncoder (``predict(pairs)``, ``rank(query, docs)``);
``rerank`` returns full :class:`Rank1Result` objects.

A ``Rank1`` is safe to share between threads: the llama.cpp context belongs to one owner thread
(:class:`~rank1_local.backends.llama.owner.EngineOwner`), every call goes through the
:class:`~rank1_local.pipeline.Pipeline` (its ``engine``) to it, and concurrent calls share one continuous batch.
Each call gets exactly its own results. :meth:`Rank1.close` (or leaving a ``with`` block) may be called from any
thread: calls in flight are cancelled with a :class:`Rank1Error`, and llama.cpp's memory is freed only after the
owner has stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rank1_local.backends.llama.engine import SAMPLING, EngineConfig, LlamaEngine, llama_cpp_module
from rank1_local.backends.llama.owner import EngineOwner
from rank1_local.backends.llama.scheduler import SchedulerParams
from rank1_local.backends.llama.tokenizer import LlamaTokenizer
from rank1_local.cache.store import JudgmentCache
from rank1_local.core.cards import RANK1, ModelCard, card_named, recognise_card
from rank1_local.core.config import ScoringConfig, split_settings
from rank1_local.core.errors import Rank1Error, UnsupportedModelError
from rank1_local.core.protocol import answer_token_ids
from rank1_local.core.reranker import Reranker
from rank1_local.models.bundle import bundle_card, is_bundle, read_bundle
from rank1_local.models.gguf_file import GgufLayout, read_gguf_layout
from rank1_local.models.model_files import resolve_gguf
from rank1_local.models.output_layer import check_output_layer
from rank1_local.pipeline import Pipeline
from rank1_local.pipeline.admission import check_max_waiting
from rank1_local.version import __version__

logger = logging.getLogger(__name__)

# llama.cpp's context size is a uint32 (n_ctx) and so is its batch (n_batch)
UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class LlamaSettings:
    """Engine settings of the llama.cpp backend: they change speed and memory, never scores.

    Args:
        n_gpu_layers: layers to offload (0 = CPU only, -1 = all).
        parallel: pairs decoded together (continuous batching), across all callers.
        threads: CPU threads (default: the cores other processes leave free, re-read between steps).
        n_batch: tokens per ``llama_decode`` call.
        f32_kv_cache: keep the KV cache in float32 instead of float16.
        max_waiting: pairs that may wait for a slot at once (None: no limit); more is refused at once
            (:class:`~rank1_local.pipeline.Overloaded`; the server answers 503 with Retry-After).
        sampling: where each row's greedy token and top 20 are found: "host" (from the full-vocabulary logits,
            without copying them), "device" (a top-20 sampler chain in llama.cpp's graph: 20 candidates cross to the
            host instead of the whole vocabulary), or "auto" (device when layers are offloaded to a GPU, host on the
            CPU, where the graph's top-k costs more than it saves: benchmarks/results/speed.md). The scores and
            reasoning are the same either way.
    """

    n_gpu_layers: int = 0
    parallel: int = 4
    threads: int | None = None
    n_batch: int = 512
    f32_kv_cache: bool = False
    max_waiting: int | None = None
    sampling: str = "auto"

    def __post_init__(self) -> None:
        if self.sampling not in ("auto", *SAMPLING):
            raise Rank1Error(f"sampling must be auto, host or device, not {self.sampling!r}")
        for name in ("n_gpu_layers", "parallel", "n_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise Rank1Error(f"{name} must be an integer, got {value!r}")
        if self.parallel < 1:
            raise Rank1Error(f"parallel must be at least 1, got {self.parallel}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise Rank1Error(f"threads must be at least 1, got {self.threads}")
        if not 1 <= self.n_batch <= UINT32_MAX:
            raise Rank1Error(f"n_batch must be between 1 and {UINT32_MAX}, got {self.n_batch}")
        if self.n_gpu_layers < -1:
            raise Rank1Error(f"n_gpu_layers must be -1 (all), 0 (CPU) or a layer count, got {self.n_gpu_layers}")
        check_max_waiting(self.max_waiting)

    def check_config(self, config: ScoringConfig) -> None:
        """That these settings can run ``config``: every slot's context in llama.cpp's KV cache."""
        kv_cells(config, self)


def kv_cells(config: ScoringConfig, settings: LlamaSettings) -> int:
    """KV cells of the unified cache: one context per slot, plus sequence 0's shared prefix; refused when llama.cpp's
    uint32 cannot hold it (it would wrap around silently)."""
    cells = (config.n_ctx + 1) * (settings.parallel + 1)
    if cells > UINT32_MAX:
        raise Rank1Error(f"n_ctx ({config.n_ctx}) x (parallel + 1) ({settings.parallel + 1}) = {cells} KV cells is "
                         f"more than llama.cpp's context size can hold ({UINT32_MAX}); lower n_ctx or parallel")
    return cells


def readable_layout(path: Path) -> GgufLayout | None:
    """The GGUF's layout, None for a damaged file (llama.cpp refuses it with its own words when it loads)."""
    try:
        return read_gguf_layout(path)
    except Rank1Error:
        return None


def gguf_card(path: Path, card: str | ModelCard | None, bundle: Path | None = None,
              layout: GgufLayout | None = None) -> ModelCard:
    """The model card of a GGUF: the one named, else the one the manifest of ``bundle`` (the bundle folder it was
    opened from) records, else the one its metadata (``layout``'s, when read already) and name show."""
    if isinstance(card, ModelCard):
        return card
    if card is not None:
        return card_named(card)
    layout = layout or readable_layout(path)
    metadata = layout.metadata if layout else {}
    recorded = bundle_card(read_bundle(bundle), metadata) if bundle is not None else None
    return recorded or recognise_card(gguf_metadata=metadata, name=path.name)


def resolve_sampling(settings: LlamaSettings) -> str:
    """``auto``: on the device when layers run on a GPU (its rows would otherwise cross to the host whole), on the
    host when everything runs on the CPU."""
    if settings.sampling != "auto":
        return settings.sampling
    offloaded = settings.n_gpu_layers != 0 and bool(llama_cpp_module().llama_supports_gpu_offload())
    return "device" if offloaded else "host"


def engine_facts(device: str, settings: LlamaSettings) -> dict[str, Any]:
    """The engine facts that can change greedy decoding's numerics: where it runs, the KV cache type, the versions of
    llama.cpp and of rank1-local."""
    try:
        llama_cpp_version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        llama_cpp_version = "unknown"
    return {"device": device, "f32_kv_cache": settings.f32_kv_cache, "llama_cpp": llama_cpp_version,
            "rank1_local": __version__}


class Rank1(Reranker):
    """A rank1 reranker running a GGUF model in llama.cpp.

    Args:
        model: path to a .gguf file, a bundle folder, or a hub id with a published GGUF
            (see :func:`rank1_local.models.model_files.resolve_gguf`).
        config: the default protocol settings (:class:`ScoringConfig`); keyword arguments of the same names
            (``max_think_tokens=…``) build one. A call may pass its own (``score_pairs(pairs, config=…)``); the
            context length is fixed at load.
        settings: engine settings (:class:`LlamaSettings`); keyword arguments of the same names build one.
        gguf_type: the GGUF type to fetch for a hub id.
        cache: a judgment cache (:class:`~rank1_local.cache.store.JudgmentCache`, or the path of its SQLite
            file): pairs already judged by this model file under the same settings are served from it.
        card: the model card (``rank1``, ``qwen3-reranker``); default: the one a bundle's manifest records, else the
            one the GGUF's metadata and name show (:func:`gguf_card`).
    """

    backend = "llama.cpp"

    def __init__(self, model: str | Path, config: ScoringConfig | None = None,
                 settings: LlamaSettings | None = None, *, gguf_type: str | None = None,
                 cache: str | Path | JudgmentCache | None = None, card: str | ModelCard | None = None,
                 **kwargs: object) -> None:
        config, settings = split_settings("Rank1", config, settings, LlamaSettings, kwargs)
        n_cells = kv_cells(config, settings)
        model_path = resolve_gguf(model, gguf_type=gguf_type)
        layout = readable_layout(model_path)
        folder = Path(model).expanduser()
        self.card = gguf_card(model_path, card, folder if is_bundle(folder) else None, layout)
        if layout is not None:
            check_output_layer(model_path, layout)
        engine_config = EngineConfig(kv_cells=n_cells, n_seq_max=settings.parallel + 1, n_batch=settings.n_batch,
                                     n_threads=settings.threads, n_gpu_layers=settings.n_gpu_layers,
                                     f32_kv_cache=settings.f32_kv_cache, sampling=resolve_sampling(settings))
        self._start(config, settings, model_path, lambda: LlamaTokenizer(model_path),
                    lambda: LlamaEngine(model_path, engine_config), cache)

    def _start(self, config: ScoringConfig, settings: LlamaSettings, model_path: Path, open_tokenizer: Callable[[], Any],
               open_engine: Callable[[], Any], cache: str | Path | JudgmentCache | None) -> None:
        """Open the cache, the tokenizer and the owner thread (which opens the engine), then the pipeline. Each is
        registered for closing as soon as it exists, so a failure at any step frees what was made before it, in
        reverse order, and raises. ``open_engine`` must not hold this object: the owner thread would keep it alive,
        and ``del model`` would never close it."""
        self.config, self.settings, self.model_path = config, settings, model_path
        with ExitStack() as resources:
            self.cache = cache if cache is None or isinstance(cache, JudgmentCache) else JudgmentCache(cache)
            if self.cache is not None:
                resources.callback(self.cache.close)
            self.tokenizer = open_tokenizer()
            resources.callback(self.tokenizer.close)
            card = self.card
            try:
                self.true_id, self.false_id = answer_token_ids(self.tokenizer.tokenize, card.answers, card.name)
            except UnsupportedModelError as exc:
                raise UnsupportedModelError(f"{model_path.name}: {exc}") from None
            params = SchedulerParams(settings.parallel, self.true_id, self.false_id, reasons=card.reasons)
            self._owner = EngineOwner(open_engine, params, self.tokenizer.tokenize, card=card)
            resources.callback(self._owner.close)
            self._engine_facts = engine_facts(self._owner.device.description, settings)
            facts, card_facts = self._engine_facts, ({} if card is RANK1 else {"card": card.name})
            self.engine = Pipeline(self.tokenizer, self._owner, config, backend=self.backend,
                                   device=self._owner.device.description, cache=self.cache, model_path=model_path,
                                   cache_settings=lambda c: {**c.to_dict(), **card_facts, "engine": facts},
                                   max_waiting=settings.max_waiting, card=card)
            self._resources = resources.pop_all()
        logger.info("loaded %s on %s", model_path.name, self.device)

    @property
    def device(self) -> str:
        return self._owner.device.description

    def tokenize(self, text: str) -> list[int]:
        """``text`` as this model's token ids (BOS where the model adds one, special tokens parsed)."""
        self._check_open()
        return self.tokenizer.tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        self._check_open()
        return self.tokenizer.detokenize(ids)

    @property
    def slots(self) -> int:
        return self.settings.parallel

    @property
    def active_slots(self) -> int:
        return self._owner.active_slots

    @property
    def waiting(self) -> int:
        """Pairs admitted and not started."""
        return self.engine.admission.outstanding

    @property
    def tokens(self) -> tuple[int, int]:
        """(prompt, generated) tokens decoded since load."""
        return self._owner.tokens

    def cache_settings(self, config: ScoringConfig | None = None) -> dict[str, Any]:
        """What the judgment cache keys on besides the model file and the prompt: the protocol settings and the
        engine facts that can change greedy decoding's numerics (:func:`engine_facts`)."""
        return {**self.score_settings(config), "engine": self._engine_facts}

    def _close_backend(self) -> None:
        """The owner thread stops (and frees llama.cpp's context and model), then the tokenizer's vocabulary is freed
        and the judgment cache's pending rows are written."""
        self._resources.close()
