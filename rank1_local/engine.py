"""A thin, explicit wrapper over llama.cpp's low-level API (llama-cpp-python bindings).

One model, one context with a *unified* KV cache (so a prompt prefix copied to several sequences
is stored once), one reusable batch. Everything above this module works with plain token ids.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rank1_local.errors import CorruptFileError, Rank1Error
from rank1_local.llama_logits import check_gguf_file

logger = logging.getLogger(__name__)

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int  # KV cells in total (all sequences together)
    n_seq_max: int
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    f32_kv_cache: bool = False
    verbose: bool = False  # let llama.cpp print its own load/compute logs


@dataclass(frozen=True)
class BatchEntry:
    token: int
    pos: int
    seq_id: int
    logits: bool


@dataclass(frozen=True)
class BackendInfo:
    gpu_offload_supported: bool
    n_gpu_layers: int
    n_layers: int

    @property
    def description(self) -> str:
        if not self.gpu_offload_supported or self.n_gpu_layers == 0:
            return "CPU"
        offloaded = self.n_layers if self.n_gpu_layers < 0 else min(self.n_gpu_layers, self.n_layers)
        return f"GPU offload ({offloaded}/{self.n_layers} layers)"


class LlamaEngine:
    def __init__(self, path: str | Path, config: EngineConfig) -> None:
        import llama_cpp as lc

        self.lc = lc
        self.path = Path(path)
        check_gguf_file(self.path)
        from llama_cpp import _logger

        _logger.set_verbose(config.verbose)  # llama-cpp-python's switch for llama.cpp's stderr log
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers if config.n_gpu_layers >= 0 else 0x7FFFFFFF
        self.model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise CorruptFileError(f"{self.path}: llama.cpp could not load this GGUF "
                                   "(unsupported architecture or damaged file)")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = min(config.n_batch, 512)
        cparams.n_seq_max = config.n_seq_max
        cparams.kv_unified = True
        threads = config.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if config.f32_kv_cache:
            cparams.type_k = GGML_TYPE_F32
            cparams.type_v = GGML_TYPE_F32
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise Rank1Error(f"llama.cpp could not create a context of {config.n_ctx} tokens "
                             f"for {config.n_seq_max} sequences (out of memory?)")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_batch = config.n_batch
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.model)
        self._batch = lc.llama_batch_init(config.n_batch, 0, 1)
        self.backend = BackendInfo(bool(lc.llama_supports_gpu_offload()), config.n_gpu_layers,
                                   lc.llama_model_n_layer(self.model))

    # --- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids as the HF tokenizer (and so vLLM) makes them: BOS where the model adds one, special
        tokens parsed."""
        self._check_open()
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, True, True)
        if n < 0:
            raise Rank1Error(f"tokenization failed ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    # --- KV cache -----------------------------------------------------------------------------
    def seq_copy(self, src: int, dst: int) -> None:
        self.lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.lc.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.memory, True)

    # --- decoding -----------------------------------------------------------------------------
    def decode(self, entries: list[BatchEntry]) -> dict[int, np.ndarray]:
        """Decode one batch; returns full-vocabulary logits for every entry that asked for them,
        keyed by the entry's index in ``entries``."""
        if not entries:
            return {}
        self._check_open()
        if len(entries) > self.n_batch:
            raise ValueError(f"batch of {len(entries)} tokens exceeds n_batch {self.n_batch}")
        b = self._batch
        b.n_tokens = len(entries)
        for i, e in enumerate(entries):
            b.token[i] = e.token
            b.pos[i] = e.pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = e.seq_id
            b.logits[i] = 1 if e.logits else 0
        status = self.lc.llama_decode(self.ctx, b)
        if status != 0:
            raise Rank1Error(f"llama_decode failed with status {status} "
                             "(KV cache full: lower --parallel or raise the context size)")
        out: dict[int, np.ndarray] = {}
        for i, e in enumerate(entries):
            if e.logits:
                ptr = self.lc.llama_get_logits_ith(self.ctx, i)
                out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    def _check_open(self) -> None:
        if not getattr(self, "ctx", None):
            raise Rank1Error(f"{self.path.name}: the model was closed; load it again to keep using it")

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self.lc.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
