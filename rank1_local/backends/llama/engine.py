"""A thin, explicit wrapper over llama.cpp's low-level API (llama-cpp-python bindings).

One model, one context with a *unified* KV cache (so a prompt prefix copied to several sequences
is stored once), one reusable batch. Everything above this module works with plain token ids.

An engine belongs to the thread that created it (the context's owner, :mod:`rank1_local.backends.llama.owner`):
every method refuses a call from another thread, and every call after :meth:`LlamaEngine.close`, with a
:class:`Rank1Error`, so no Python call can reach llama.cpp memory that another thread is using or that was freed.

llama-cpp-python exposes llama.cpp's C structs through ctypes; a field set by a name the struct does not
have would be silently ignored, so every field this module sets is checked against the struct first
(:func:`set_fields`), and a renamed field is a clear error at load time instead of a silent change.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rank1_local.backends.llama.logs import route_llama_logs
from rank1_local.backends.llama.threads import CoreShare, set_openmp_waiting
from rank1_local.core.decoder import CandidateRow, HostRow, Row
from rank1_local.core.errors import CorruptFileError, Rank1Error
from rank1_local.models.gguf_file import GGML_TYPE_F32, check_gguf_file

logger = logging.getLogger(__name__)


SAMPLING = ("host", "device")
TOP_K = 20  # the candidates a device row holds: the official protocol reads the top 20 at the answer


@dataclass(frozen=True)
class EngineConfig:
    kv_cells: int  # llama.cpp's n_ctx: KV cells in total, every sequence together (not the context of one pair)
    n_seq_max: int
    n_batch: int = 512
    n_threads: int | None = None  # None: every core the rest of the machine leaves free, re-read between steps
    n_gpu_layers: int = 0
    f32_kv_cache: bool = False
    sampling: str = "host"  # host: rows read from the full logits; device: a top-20 sampler chain in the graph


@dataclass
class StepTimings:
    """Where the decode steps' time went (for benchmarks): inside ``llama_decode``, and reading the rows out."""

    steps: int = 0
    rows: int = 0
    decode_seconds: float = 0.0
    readout_seconds: float = 0.0

    def add(self, decode: float, readout: float, rows: int) -> None:
        self.steps += 1
        self.rows += rows
        self.decode_seconds += decode
        self.readout_seconds += readout


@dataclass(frozen=True)
class BatchEntry:
    token: int
    pos: int
    seq_id: int
    logits: bool
    host: bool = False  # its row must come from the full logits (a row the device's candidates could not answer)


@dataclass(frozen=True)
class DeviceInfo:
    gpu_offload_supported: bool
    n_gpu_layers: int
    n_layers: int

    @property
    def description(self) -> str:
        if not self.gpu_offload_supported or self.n_gpu_layers == 0:
            return "CPU"
        offloaded = self.n_layers if self.n_gpu_layers < 0 else min(self.n_gpu_layers, self.n_layers)
        return f"GPU offload ({offloaded}/{self.n_layers} layers)"


def set_fields(struct: ctypes.Structure, **values: Any) -> None:
    """Assign struct fields by name, refusing names the ctypes struct does not declare (ctypes would accept
    them as plain Python attributes and llama.cpp would never see them)."""
    declared = {name for name, *_ in type(struct)._fields_}
    unknown = sorted(set(values) - declared)
    if unknown:
        raise Rank1Error(f"this llama-cpp-python build has no {type(struct).__name__} field(s) {', '.join(unknown)}; "
                         "install a llama-cpp-python version within the bounds rank1-local declares")
    for name, value in values.items():
        setattr(struct, name, value)


@functools.cache
def llama_cpp_module() -> Any:
    """The llama_cpp module with llama.cpp's backend initialised and its log routed to Python logging, once per
    process (its CPU threads' waiting set first: :mod:`rank1_local.backends.llama.threads`)."""
    set_openmp_waiting()
    import llama_cpp

    route_llama_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    return llama_cpp


class LlamaEngine:
    """One model, one context, one batch, opened in that order and freed in the reverse one (an ExitStack holds each
    handle as soon as it exists: a failure at any step of loading frees what was made before it, and raises)."""

    def __init__(self, path: str | Path, config: EngineConfig) -> None:
        self.path = Path(path)
        self._owner = threading.get_ident()
        self.ctx = self.model = self._batch = None
        check_gguf_file(self.path)
        lc = self.lc = llama_cpp_module()
        mparams = lc.llama_model_default_params()
        set_fields(mparams, n_gpu_layers=config.n_gpu_layers if config.n_gpu_layers >= 0 else 0x7FFFFFFF)
        cparams = lc.llama_context_default_params()
        # threads the user did not fix follow the cores other processes leave free (threads.CoreShare)
        self._share = CoreShare(os.cpu_count() or 1) if config.n_threads is None else None
        threads = self.threads = config.n_threads or os.cpu_count() or 1
        set_fields(cparams, n_ctx=config.kv_cells, n_batch=config.n_batch, n_ubatch=min(config.n_batch, 512),
                   n_seq_max=config.n_seq_max, kv_unified=True, n_threads=threads, n_threads_batch=threads,
                   no_perf=True)
        if config.f32_kv_cache:
            set_fields(cparams, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        with ExitStack() as handles:
            self.model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
            if not self.model:
                raise CorruptFileError(f"{self.path}: llama.cpp could not load this GGUF "
                                       "(unsupported architecture or damaged file)")
            handles.callback(self._free, "model", lc.llama_model_free)
            self.ctx = lc.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise Rank1Error(f"llama.cpp could not create a context of {config.kv_cells} tokens "
                                 f"for {config.n_seq_max} sequences (out of memory?)")
            handles.callback(self._free, "ctx", lc.llama_free)
            self._batch = lc.llama_batch_init(config.n_batch, 0, 1)
            handles.callback(self._free, "_batch", lc.llama_batch_free)
            self.vocab = lc.llama_model_get_vocab(self.model)
            self.memory = lc.llama_get_memory(self.ctx)
            self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
            self.n_batch = config.n_batch
            self.kv_cells = lc.llama_n_ctx(self.ctx)
            self.device = DeviceInfo(bool(lc.llama_supports_gpu_offload()), config.n_gpu_layers,
                                     lc.llama_model_n_layer(self.model))
            self.sampling = config.sampling
            self._chains: dict[int, Any] = {}  # sequence -> its attached sampler chain (device sampling)
            self.timings = StepTimings()
            handles.callback(self._free_samplers)  # before the context is freed
            self._handles = handles.pop_all()

    def _free(self, name: str, free: Any) -> None:
        handle = getattr(self, name)
        if handle is not None:
            setattr(self, name, None)  # first: no call can reach freed memory through this object
            free(handle)

    # --- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Ids as the HF tokenizer (and so vLLM) makes them: BOS where the model adds one, special
        tokens parsed."""
        self._check()
        return tokenize_text(self.lc, self.vocab, text)

    def piece(self, token: int) -> bytes:
        """The token's text as bytes, special tokens rendered."""
        self._check()
        return token_piece(self.lc, self.vocab, token)

    def detokenize(self, ids: list[int]) -> str:
        self._check()
        return b"".join(token_piece(self.lc, self.vocab, t) for t in ids).decode("utf-8", "ignore")

    def is_eog(self, token: int) -> bool:
        self._check()
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    # --- KV cache -----------------------------------------------------------------------------
    def seq_copy(self, src: int, dst: int) -> None:
        self._check()
        self.lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self._check()
        self.lc.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def clear(self) -> None:
        self._check()
        self.lc.llama_memory_clear(self.memory, True)

    # --- decoding -----------------------------------------------------------------------------
    def decode(self, entries: list[BatchEntry]) -> dict[int, Row]:
        """Decode one batch; returns the output row of every entry that asked for one, keyed by the entry's index in
        ``entries``: a view of llama.cpp's logits (nothing is copied), valid until the next call."""
        if not entries:
            return {}
        self._check()
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
        if self.sampling == "device":
            for e in entries:
                if e.logits:
                    self._sample_on_device(e.seq_id, not e.host)
        if self._share is not None and (threads := self._share.threads()) != self.threads:
            self.lc.llama_set_n_threads(self.ctx, threads, threads)
            self.threads = threads
        started = time.perf_counter()
        status = self.lc.llama_decode(self.ctx, b)
        decoded = time.perf_counter()
        if status != 0:
            raise Rank1Error(f"llama_decode failed with status {status} "
                             "(KV cache full: lower --parallel or raise the context size)")
        out: dict[int, Row] = {}
        for i, e in enumerate(entries):
            if not e.logits:
                continue
            if e.seq_id in self._chains:
                n = self.lc.llama_get_sampled_candidates_count_ith(self.ctx, i)
                ids = np.ctypeslib.as_array(self.lc.llama_get_sampled_candidates_ith(self.ctx, i), shape=(n,))
                logits = np.ctypeslib.as_array(self.lc.llama_get_sampled_logits_ith(self.ctx, i), shape=(n,))
                out[i] = CandidateRow(ids.tolist(), logits.tolist())
            else:
                ptr = self.lc.llama_get_logits_ith(self.ctx, i)
                out[i] = HostRow(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        self.timings.add(decoded - started, time.perf_counter() - decoded, len(out))
        return out

    def _sample_on_device(self, seq: int, on: bool) -> None:
        """Attach a top-20 → greedy sampler chain to ``seq`` (its rows then hold only their 20 best candidates,
        computed in llama.cpp's graph, and no full-vocabulary row is copied), or detach it (the next row is read
        from the full logits). A chain is attached once (llama.cpp initialises it when attached): detaching frees
        it, and a later attach makes a new one. A build that cannot offload the chain samples on the host."""
        if (seq in self._chains) == on:
            return
        lc = self.lc
        if not on:
            lc.llama_set_sampler(self.ctx, seq, None)
            lc.llama_sampler_free(self._chains.pop(seq))
            return
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(TOP_K))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        if not lc.llama_set_sampler(self.ctx, seq, chain):
            lc.llama_sampler_free(chain)
            logger.warning("this llama.cpp build cannot run the sampler in its graph: rows are read on the host")
            self._free_samplers()
            self.sampling = "host"
            return
        self._chains[seq] = chain

    def _free_samplers(self) -> None:
        for seq, chain in list(self._chains.items()):
            if self.ctx:
                self.lc.llama_set_sampler(self.ctx, seq, None)
            self.lc.llama_sampler_free(chain)
            del self._chains[seq]

    def _check(self) -> None:
        """Refuse a call after :meth:`close`, or from a thread other than the owner."""
        if not self.ctx:
            raise Rank1Error(f"{self.path.name}: the model was closed; load it again to keep using it")
        if threading.get_ident() != self._owner:
            raise Rank1Error(f"{self.path.name}: this llama.cpp context belongs to the thread that created it; "
                             "submit work through the model (Rank1) instead of calling its engine directly")

    def close(self) -> None:
        """Free the batch, context and model (the one path that releases llama.cpp memory). Only the owner frees
        them: from another thread this is an error, and after the first call it does nothing."""
        handles = getattr(self, "_handles", None)
        if handles is None:
            return
        if threading.get_ident() != self._owner:
            raise Rank1Error(f"{self.path.name}: only the thread that owns this llama.cpp context may free it")
        self._handles = None
        handles.close()


def tokenize_text(lc: Any, vocab: Any, text: str) -> list[int]:
    """``text`` as token ids of ``vocab``: BOS where the model adds one, special tokens parsed."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (lc.llama_token * n_max)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, True, True)
    if n < 0:
        raise Rank1Error(f"tokenization failed ({n})")
    return list(buf[:n])


def token_piece(lc: Any, vocab: Any, token: int) -> bytes:
    """A token's text as bytes, special tokens rendered."""
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]
