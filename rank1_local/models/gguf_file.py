"""GGUF file facts both packages need: the magic bytes, the ggml type ids we set, a quick file check, and a full check
of the header and tensor table (without reading the weights).

:func:`read_gguf_layout` walks the header, every metadata value and every tensor's entry, and checks that the tensor
data they describe lies inside the file: a truncated, cut or garbled GGUF is refused there, in well under a second and
a few MB of memory, instead of when llama.cpp loads it (or, worse, after it was sealed into a bundle).
"""

from __future__ import annotations

import logging
import math
import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.errors import CorruptFileError, ModelNotFoundError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGML_TYPE_F32 = 0  # ggml_type of a float32 tensor (KV cache type in llama_context_params)


def _unreadable(path: Path, exc: OSError) -> CorruptFileError:
    return CorruptFileError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as exc:
        raise _unreadable(path, exc) from None


def check_gguf_file(path: Path) -> None:
    """Raise a clear error unless ``path`` is an existing, readable GGUF file."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: is a folder, expected a .gguf file")
    if not is_gguf(path):
        raise CorruptFileError(f"{path}: not a GGUF file (wrong magic bytes)")

# llama.cpp's file types (``llama_ftype``) by the names GGUF files and llama-quantize use.
LLAMA_FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23,
    "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31,
    "BF16": 32,
}

# GGUF metadata value types: fixed sizes (struct format), STRING = 8, ARRAY = 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class GgufTensor:
    """One entry of a GGUF's tensor table: its ggml type, its dimensions (``ne``, the row length first) and where its
    data lies in the file."""

    ggml_type: int
    dims: tuple[int, ...]
    start: int  # the byte its data starts at, in the file
    nbytes: int


@dataclass(frozen=True)
class GgufLayout:
    """What a GGUF's header says, checked against the file's size."""

    version: int
    n_tensors: int
    metadata: dict[str, Any]  # scalar and string values, the string arrays asked for (other arrays are checked only)
    data_end: int  # where the last tensor's data ends
    size: int  # the file's size
    tensors: dict[str, GgufTensor]

    @property
    def file_type(self) -> str | None:
        names = {v: k for k, v in LLAMA_FTYPES.items()}
        value = self.metadata.get("general.file_type")
        return names.get(value) if isinstance(value, int) else None


class _Reader:
    def __init__(self, path: Path, buf: Any) -> None:
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: damaged GGUF file ({what}); download or export it again")

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail(f"the header is cut off at byte {self.size}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")
        self.pos += n

    def string(self, what: str) -> str:
        n = self.take("<Q")
        start = self.pos
        self.skip(n, what)
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, kind: int, key: str, keep: bool = False) -> Any:
        """The value of metadata ``key``; an array of strings only when ``keep``, other arrays never (None, their
        extent checked)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(f"the value of {key}")
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item]), f"the array {key}")
            elif item == _STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"the array {key} of {count} strings runs past the end of the file")
                if keep:
                    return [self.string(f"a string of the array {key}") for _ in range(count)]
                for _ in range(count):
                    self.skip(self.take("<Q"), f"a string of the array {key}")
            else:
                raise self.fail(f"the array {key} has items of unknown type {item}")
            return None
        raise self.fail(f"{key} has unknown value type {kind}")


def _tensor_bytes(ggml_type: int, n_elements: int, reader: _Reader, name: str) -> int:
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise reader.fail(f"tensor {name} has unknown type {ggml_type}") from None
    if n_elements % block:
        raise reader.fail(f"tensor {name} has {n_elements} elements, not a multiple of its type's block of {block}")
    return n_elements // block * type_size


def read_gguf_layout(path: Path, arrays: Collection[str] = ()) -> GgufLayout:
    """Walk a GGUF's header, metadata and tensor table (not the weights) and check that every tensor's data lies
    inside the file; the metadata arrays of strings named in ``arrays`` are kept (as lists). Raises
    :class:`CorruptFileError` naming what is wrong, or that the file cannot be read."""
    check_gguf_file(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CorruptFileError(f"{path}: damaged GGUF file (only {size} bytes); download or export it again")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _layout(path, buf, size, frozenset(arrays))
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _layout(path: Path, buf: Any, size: int, arrays: frozenset[str]) -> GgufLayout:
    r = _Reader(path, buf)
    r.skip(4, "the magic")
    version = r.take("<I")
    if version not in (2, 3):
        raise r.fail(f"GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    if n_kv > size // 12 or n_tensors > size // 24:
        raise r.fail(f"the header claims {n_kv} metadata entries and {n_tensors} tensors")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string("a metadata key")
        metadata[key] = r.value(r.take("<I"), key, keep=key in arrays)
    tensors = []
    for _ in range(n_tensors):
        name = r.string("a tensor name")
        n_dims = r.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise r.fail(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(r.take("<Q") for _ in range(n_dims))
        ggml_type, offset = r.take("<I"), r.take("<Q")
        tensors.append((name, dims, ggml_type, offset, _tensor_bytes(ggml_type, math.prod(dims), r, name)))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-r.pos // alignment) * alignment
    data_end = data_start
    table: dict[str, GgufTensor] = {}
    for name, dims, ggml_type, offset, nbytes in tensors:
        if offset % alignment:
            raise r.fail(f"tensor {name} starts at offset {offset}, not aligned to {alignment}")
        end = data_start + offset + nbytes
        if end > size:
            raise r.fail(f"tensor {name} ends at byte {end} but the file has {size} bytes: it is truncated")
        data_end = max(data_end, end)
        table[name] = GgufTensor(ggml_type, dims, data_start + offset, nbytes)
    return GgufLayout(version, n_tensors, {k: v for k, v in metadata.items() if v is not None}, data_end, size,
                      table)


def read_file_type(path: Path) -> str | None:
    """The type a GGUF file declares in its ``general.file_type`` metadata (``Q8_0``, ``BF16`` …), None when it
    declares none (or one we do not know). Raises :class:`CorruptFileError` for a damaged file."""
    return read_gguf_layout(path).file_type
