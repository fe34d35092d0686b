"""Importance matrices for llama.cpp quantization: compute, save, load, and hand to ``llama_model_quantize``.

An importance matrix holds, per weight matrix (by its GGUF name, e.g. ``blk.0.ffn_down.weight``), the
sum over calibration tokens of the squared input activation of every input column, and the token count
— what llama.cpp's ``llama-imatrix`` collects. Files use llama.cpp's formats:

- GGUF (current): ``general.type = "imatrix"``, ``imatrix.datasets``, ``imatrix.chunk_count``,
  ``imatrix.chunk_size``, and per matrix the F32 tensors ``<name>.in_sum2`` and ``<name>.counts``;
- legacy ``.dat`` (read only): ``n_entries``, then per entry name, ncall, nval, values (mean * ncall).

:func:`compute_imatrix` runs the transformers source model over calibration texts (the ``reference``
extra); reading, writing and using a file needs neither torch nor transformers.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rank1_local.core.errors import CorruptFileError, Rank1Error
from rank1_local.models.gguf_file import GGUF_MAGIC

logger = logging.getLogger(__name__)


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32, n_in * n_mat: sum of squared input activations per column
    counts: np.ndarray  # float32, n_mat: tokens seen

    def mean(self) -> np.ndarray:
        """Per-column mean of squared activations, as llama.cpp's quantizer uses it (1 where nothing was seen)."""
        n_mat = len(self.counts)
        sums = self.sums.reshape(n_mat, -1).astype(np.float32)
        out = np.ones_like(sums)
        for j, c in enumerate(self.counts):
            if c > 0:
                out[j] = sums[j] / c
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def write_imatrix(path: Path, imatrix: Imatrix) -> None:
    """Write the GGUF imatrix format, atomically."""
    import gguf

    from rank1_local.runs.atomic import atomic_path

    if not imatrix.entries:
        raise Rank1Error("refusing to write an empty importance matrix")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", list(imatrix.datasets) or ["unknown"])
        writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
        writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
        for name in sorted(imatrix.entries):  # deterministic order, as llama-imatrix writes
            e = imatrix.entries[name]
            n_mat = len(e.counts)
            writer.add_tensor(f"{name}.in_sum2", e.sums.astype(np.float32).reshape(n_mat, -1))
            writer.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(n_mat, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_imatrix(path: Path) -> Imatrix:
    """Read an imatrix file in llama.cpp's GGUF or legacy ``.dat`` format."""
    if not path.is_file():
        raise Rank1Error(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    except (ValueError, struct.error, KeyError, IndexError) as exc:
        raise CorruptFileError(f"{path}: not a llama.cpp imatrix file ({exc})") from None


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    if value("general.type") != "imatrix":
        raise ValueError("a GGUF file, but not an imatrix (general.type is not 'imatrix')")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.array(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        raise ValueError(f"mismatched sums and counts for {sorted(set(sums) ^ set(counts))[:3]}")
    entries = {name: ImatrixEntry(sums[name], counts[name]) for name in sums}
    return Imatrix(entries, list(value("imatrix.datasets") or []), int(value("imatrix.chunk_count") or 0),
                   int(value("imatrix.chunk_size") or 0))


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        out = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return out

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise ValueError(f"implausible entry count {n_entries}")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("<ii")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy()
        pos += 4 * nval
        # legacy values are mean * ncall: store them as sums over ncall "tokens"
        entries[name] = ImatrixEntry(values, np.array([max(ncall, 1)], dtype=np.float32))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            datasets = [data[pos:pos + length].decode("utf-8", "replace")]
    return Imatrix(entries, datasets, chunk_count, 0)


class ImatrixParam:
    """The C array of ``llama_model_imatrix_data`` (null-terminated) for ``llama_model_quantize_params``.
    Keeps the buffers alive as long as the object lives."""

    def __init__(self, imatrix: Imatrix) -> None:
        import llama_cpp

        items = sorted(imatrix.entries.items())
        self._arrays = [np.ascontiguousarray(e.mean(), dtype=np.float32) for _, e in items]
        self._names = [name.encode() for name, _ in items]
        self.array = (llama_cpp.llama_model_imatrix_data * (len(items) + 1))()
        for i, (name, values) in enumerate(zip(self._names, self._arrays)):
            self.array[i].name = name
            self.array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self.array[i].size = values.size
        self.array[len(items)].name = None  # terminator

    @property
    def pointer(self) -> Any:
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def compute_imatrix(model_dir: Path, texts: Sequence[str], *, gguf_names: dict[str, str], dtype: str = "float32",
                    device: str = "cpu", dataset: str = "rank1-calibration", progress: bool = True) -> Imatrix:
    """Run the transformers model over ``texts`` and collect, for every linear layer whose weight has a GGUF
    name in ``gguf_names`` (HF weight name -> GGUF name), the sum of squared inputs per column."""
    from quantize.hf_reference import require_reference_extra

    require_reference_extra()
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise Rank1Error("no calibration texts: an importance matrix needs calibration data")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        gguf_name = gguf_names.get(f"{module_name}.weight")
        if not isinstance(module, torch.nn.Linear) or gguf_name is None:
            continue

        def hook(_mod: Any, inputs: tuple, _out: Any, name: str = gguf_name) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sq = (x * x).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    if not hooks:
        raise Rank1Error(f"{model_dir}: no linear layers matched the GGUF tensor names")
    n_tokens = 0
    try:
        with torch.no_grad():
            for text in tqdm(texts, desc="imatrix", unit="text", disable=not progress):
                ids = tokenizer.encode(text, add_special_tokens=True)
                model(torch.tensor([ids], device=device))
                n_tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    entries = {name: ImatrixEntry(sums[name].cpu().numpy().astype(np.float32),
                                  np.array([counts[name]], dtype=np.float32)) for name in sums}
    logger.info("imatrix: %d matrices over %d texts (%d tokens)", len(entries), len(texts), n_tokens)
    return Imatrix(entries, [dataset], chunk_count=len(texts), chunk_size=max(1, n_tokens // max(1, len(texts))))
