"""Read safetensors files without torch: memory-mapped numpy views, tensor by tensor.

Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``,
then the raw data. bf16 has no numpy dtype, so bf16 tensors are exposed as uint16 and widened to
float32 on request (exact: bf16 is the top half of an f32).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rank1_local.core.errors import CorruptFileError, UnsupportedModelError

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range inside the data section."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header, validating offsets against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CorruptFileError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len <= 0 or header_len > min(_MAX_HEADER, size - 8):
                raise CorruptFileError(f"{path}: not a safetensors file (header length {header_len} "
                                       f"does not fit a file of {size} bytes)")
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({exc})") from None
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: safetensors file is missing") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise UnsupportedModelError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        entry = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
        if entry.end > size or entry.end - entry.begin != entry.n_elements * _DTYPES[dtype].itemsize:
            raise CorruptFileError(
                f"{path}: tensor {name!r} needs bytes {entry.begin}..{entry.end} but the file has {size} "
                "bytes (truncated or corrupt download?)")
        entries[name] = entry
    return entries


def load_raw(entry: TensorEntry) -> np.ndarray:
    """A read-only memory-mapped view of the tensor in its stored dtype (bf16 as uint16)."""
    dtype = _DTYPES[entry.dtype]
    if entry.n_elements == 0:
        return np.zeros(entry.shape, dtype=dtype)
    return np.memmap(entry.path, dtype=dtype, mode="r", offset=entry.begin, shape=entry.shape)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a float tensor (or a slice of one) to float32; bf16 exactly."""
    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32", "F64"):
        return np.asarray(raw, dtype=np.float32)
    raise UnsupportedModelError(f"cannot convert {dtype} weights to float")


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], *,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: (dtype, shape, raw little-endian bytes)}`` as one safetensors file (tensors in name order, the
    header padded with spaces to 8 bytes, as the safetensors library writes it)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        if dtype not in _DTYPES or len(raw) != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize:
            raise ValueError(f"{name}: {len(raw)} bytes do not hold a {dtype} tensor of shape {shape}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in sorted(tensors):
            f.write(tensors[name][2])
