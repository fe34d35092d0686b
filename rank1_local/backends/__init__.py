"""The three ways to run rank1, behind one :class:`~rank1_local.core.reranker.Reranker` interface.

- ``llama.cpp``: :class:`~rank1_local.backends.llama.facade.Rank1`, GGUF files on CPU, CUDA or Metal (the default);
- ``transformers``: :class:`~rank1_local.backends.hf.TransformersRank1`, Hugging Face checkpoints (incl. AWQ/GPTQ);
- ``vllm``: :class:`~rank1_local.backends.vllm.VllmRank1`, the official engine.

Each backend imports its heavy library only when it is opened, and names what to install when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.reranker import Reranker

BACKENDS = ("llama.cpp", "transformers", "vllm")


def open_reranker(backend: str, model: str | Path, config: ScoringConfig, **settings: Any) -> Reranker:
    """Load ``model`` on ``backend`` with the protocol ``config`` and the backend's own engine settings
    (``cache=``, a judgment cache or its path, is for llama.cpp only)."""
    cache = settings.pop("cache", None)
    if cache is not None and backend != "llama.cpp":
        raise Rank1Error(f"the judgment cache keys on the GGUF file: llama.cpp backend only (not {backend})")
    if backend == "llama.cpp":
        from rank1_local.backends.llama.facade import LlamaSettings, Rank1

        gguf_type = settings.pop("gguf_type", None)
        return Rank1(model, config, LlamaSettings(**settings), gguf_type=gguf_type, cache=cache)
    if backend == "transformers":
        from rank1_local.backends.hf import HFSettings, TransformersRank1

        return TransformersRank1(model, config, HFSettings(**settings))
    if backend == "vllm":
        from rank1_local.backends.vllm import VllmRank1, VllmSettings

        return VllmRank1(model, config, VllmSettings(**settings))
    raise Rank1Error(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
