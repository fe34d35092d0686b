"""The three ways to run rank1, behind one :class:`~rank1_local.core.reranker.Reranker` interface, and the registry
that names them.

- ``llama.cpp``: :class:`~rank1_local.backends.llama.facade.Rank1`, GGUF files on CPU, CUDA or Metal (the default);
- ``transformers``: :class:`~rank1_local.backends.hf.TransformersRank1`, Hugging Face checkpoints (incl. AWQ/GPTQ);
- ``vllm``: :class:`~rank1_local.backends.vllm.VllmRank1`, the official engine.

Each backend imports its heavy library only when it is opened, and names what to install when it is missing. Callers
(the CLI, the server, Ray) open a backend by name through :func:`open_reranker` and build its settings with
:meth:`BackendSpec.settings`; nothing else switches on a backend's name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.reranker import Reranker


@dataclass(frozen=True)
class BackendSpec:
    """One backend: where its reranker and settings classes live, and what it supports."""

    name: str
    module: str  # the module holding both classes (imported on first use)
    reranker_class: str
    settings_class: str
    supports_cache: bool  # the judgment cache keys on a model file's digest (a GGUF)
    takes_gguf_type: bool  # a hub id resolves to a published GGUF of a given type

    def _load(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    @property
    def settings_type(self) -> type:
        return self._load(self.settings_class)

    def settings(self, **values: Any) -> Any:
        """The backend's settings object from the values it knows (None: the default); a name it does not know is an
        error naming the backend."""
        settings_type = self.settings_type
        known = {f.name for f in fields(settings_type)}
        unknown = sorted(k for k, v in values.items() if k not in known and v is not None)
        if unknown:
            raise Rank1Error(f"the {self.name} backend has no setting {', '.join(unknown)}")
        return settings_type(**{k: v for k, v in values.items() if k in known and v is not None})

    def open(self, model: str | Path, config: ScoringConfig, settings: Any = None, *, cache: Any = None,
             gguf_type: str | None = None, card: str | None = None) -> Reranker:
        """Load ``model`` with the protocol ``config`` and the backend's ``settings`` (``card``: the model card to
        use, instead of the one the model's own facts show)."""
        if cache is not None and not self.supports_cache:
            raise Rank1Error(f"the judgment cache keys on the GGUF file: llama.cpp backend only (not {self.name})")
        kwargs: dict[str, Any] = {}
        if cache is not None:
            kwargs["cache"] = cache
        if gguf_type is not None:
            if not self.takes_gguf_type:
                raise Rank1Error(f"--gguf-type picks a GGUF for llama.cpp; the {self.name} backend runs checkpoints")
            kwargs["gguf_type"] = gguf_type
        if card is not None:
            kwargs["card"] = card
        reranker_type = self._load(self.reranker_class)
        return reranker_type(model, config, settings if settings is not None else self.settings(), **kwargs)


BACKEND_SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("llama.cpp", "rank1_local.backends.llama.facade", "Rank1", "LlamaSettings", supports_cache=True,
                takes_gguf_type=True),
    BackendSpec("transformers", "rank1_local.backends.hf", "TransformersRank1", "HFSettings", supports_cache=False,
                takes_gguf_type=False),
    BackendSpec("vllm", "rank1_local.backends.vllm", "VllmRank1", "VllmSettings", supports_cache=False,
                takes_gguf_type=False),
)}
BACKENDS = tuple(BACKEND_SPECS)


def backend_spec(name: str) -> BackendSpec:
    spec = BACKEND_SPECS.get(name)
    if spec is None:
        raise Rank1Error(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return spec


def open_reranker(backend: str, model: str | Path, config: ScoringConfig | None = None, settings: Any = None, *,
                  cache: Any = None, gguf_type: str | None = None, card: str | None = None,
                  **values: Any) -> Reranker:
    """Load ``model`` on ``backend`` with the protocol ``config`` and the backend's settings (a settings object, or
    its fields as keywords); ``cache`` (a judgment cache or its path) and ``gguf_type`` where the backend takes
    them; ``card`` (``rank1``, ``qwen3-reranker``) when the model's own facts should not decide it."""
    spec = backend_spec(backend)
    if settings is not None and values:
        raise TypeError("give settings= or its fields as keywords, not both")
    return spec.open(model, config or ScoringConfig(), settings if settings is not None else spec.settings(**values),
                     cache=cache, gguf_type=gguf_type, card=card)
