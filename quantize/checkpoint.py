"""A Hugging Face checkpoint on disk: config.json, tokenizer files and (sharded) safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.safetensors_io import FLOAT_DTYPES, TensorEntry, read_header
from rank1_local.core.errors import CorruptFileError, ModelNotFoundError, UnsupportedModelError
from rank1_local.models.bundle import MANIFEST

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    name: str
    config: dict[str, Any]
    tensors: dict[str, TensorEntry]

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else ""

    @property
    def source_dtype(self) -> str:
        """The float dtype most weights are stored in (BF16, F16 or F32)."""
        counts: dict[str, int] = {}
        for entry in self.tensors.values():
            if entry.dtype in FLOAT_DTYPES:
                counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.n_elements
        return max(counts, key=counts.__getitem__) if counts else "F32"


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{config_file}: not a JSON object")
    return config


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{index}: corrupt index file ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelNotFoundError(f"{path}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return loose
    if any(path.glob("*.bin")) or any(path.glob("*.pth")):
        raise UnsupportedModelError(
            f"{path}: only PyTorch .bin weights found; rank1-local reads safetensors only "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise ModelNotFoundError(f"{path}: no *.safetensors weights found")


def open_checkpoint(path: Path, name: str | None = None) -> Checkpoint:
    """Read config and the tensor index of a local checkpoint folder (no tensor data is loaded)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"{path}: a GGUF file, exported already; the exporter reads a Hugging Face checkpoint "
                                 f"(a folder with config.json and safetensors, or a hub id). Run it with rank1-local "
                                 f"rerank --model {path}")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: no such checkpoint folder")
    if (path / MANIFEST).is_file():
        raise ModelNotFoundError(f"{path}: a bundle (a GGUF and its manifest), exported already; the exporter reads a "
                                 f"Hugging Face checkpoint (a folder with config.json and safetensors, or a hub id). "
                                 f"Run the bundle with rank1-local rerank --model {path}")
    config = read_config(path)
    tensors: dict[str, TensorEntry] = {}
    for shard in _shard_files(path):
        for tname, entry in read_header(shard).items():
            if tname in tensors:
                raise CorruptFileError(f"{path}: tensor {tname!r} appears in more than one shard")
            tensors[tname] = entry
    if not tensors:
        raise CorruptFileError(f"{path}: the safetensors files hold no tensors")
    return Checkpoint(path=path, name=name or path.name, config=config, tensors=tensors)
