"""Full next-token logits at every position from a GGUF model through llama.cpp (for verifying exports)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from rank1_local.backends.llama.engine import llama_cpp_module
from rank1_local.core.errors import CorruptFileError
from rank1_local.models.gguf_file import GGML_TYPE_F32, check_gguf_file

logger = logging.getLogger(__name__)


class LlamaCppLogits:
    """A GGUF model in llama.cpp returning logits for every position of a token sequence.

    The KV cache is kept in F32 by default so that comparisons measure the weights, not the cache.
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int | None = None,
                 n_gpu_layers: int = 0, f32_kv_cache: bool = True) -> None:
        from llama_cpp import Llama

        llama_cpp_module()  # llama.cpp's log through the runtime's filter (its chatter at DEBUG)
        self.path = Path(path)
        check_gguf_file(self.path)
        kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv_cache else {}
        threads = threads or os.cpu_count() or 1
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                             n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                             verbose=False, **kv)
        except ValueError as exc:
            raise CorruptFileError(f"{self.path}: llama.cpp could not load this GGUF ({exc})") from None
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        """Token ids exactly as the Hugging Face tokenizer (and so vLLM) makes them: BOS only where the
        model's tokenizer adds one, and special-token text such as ``<|im_end|>`` parsed as that token."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()
