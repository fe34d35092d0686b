"""llama.cpp's own quantizer (``llama_model_quantize``) through llama-cpp-python's low-level bindings."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from quantize.gguf_types import LLAMA_CPP_TYPES
from quantize.imatrix import Imatrix, ImatrixParam
from rank1_local.backends.llama.engine import llama_cpp_module
from rank1_local.core.errors import Rank1Error

logger = logging.getLogger(__name__)


_KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


def _utf8_prefix(text: str, n_bytes: int) -> bytes:
    return text.encode("utf-8")[:n_bytes].decode("utf-8", "ignore").encode("utf-8")


def imatrix_metadata(imatrix: Imatrix, file_name: str) -> list[tuple[str, str | int]]:
    """The keys llama-quantize writes into a GGUF quantized with an importance matrix (strings cut to 127
    bytes, as llama.cpp's override struct holds)."""
    dataset = "; ".join(imatrix.datasets) or "unknown"
    return [("quantize.imatrix.file", file_name), ("quantize.imatrix.dataset", dataset),
            ("quantize.imatrix.entries_count", len(imatrix.entries)),
            ("quantize.imatrix.chunks_count", imatrix.chunk_count)]


def _kv_overrides(items: list[tuple[str, str | int]]) -> Any:
    llama_cpp = llama_cpp_module()
    array = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for i, (key, value) in enumerate(items):
        array[i].key = key.encode()
        if isinstance(value, int):
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            array[i].value.val_i64 = value
        else:
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            array[i].value.val_str = _utf8_prefix(value, _KV_STR_MAX)
    array[len(items)].key = b""  # terminator
    return array


def quantize_gguf(source: Path, target: Path, out_type: str, *, threads: int | None = None,
                  imatrix: Imatrix | None = None, imatrix_file: str = "") -> None:
    """Quantize the F32/F16/BF16 GGUF ``source`` into ``target`` of llama.cpp type ``out_type``, guided by
    ``imatrix`` when given (recorded in the output's ``quantize.imatrix.*`` metadata as llama-quantize does).
    llama.cpp's report of the run goes to Python logging like the runtime's (:mod:`rank1_local.backends.llama.logs`):
    its per-tensor lines are chatter (DEBUG), its warnings stay warnings."""
    llama_cpp = llama_cpp_module()

    if out_type not in LLAMA_CPP_TYPES:
        raise Rank1Error(f"{out_type} is not a llama.cpp quantization type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[out_type]
    params.nthread = threads or os.cpu_count() or 1
    keep_alive: list[Any] = []
    if imatrix is not None:
        matrix = ImatrixParam(imatrix)
        overrides = _kv_overrides(imatrix_metadata(imatrix, imatrix_file))
        keep_alive += [matrix, overrides]
        params.imatrix = matrix.pointer
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    logger.debug("llama.cpp quantize %s -> %s (%s)", source, target, out_type)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    del keep_alive  # the importance matrix buffers were needed until here
    if status != 0 or not target.is_file():
        raise Rank1Error(f"llama.cpp failed to quantize {source.name} to {out_type} (status {status})")
