"""Random-weight GGUF files in a real rank1 shape, written directly: for speed runs, where the weights' values do not
matter but their shapes and types do.

A 7B checkpoint would be 15 GB to draw, save and export before the first token; on the GPU machine's clock that is
minutes. So the file is written here straight from the shape: the metadata is exactly what the exporter writes
(:func:`quantize.architectures.write_hparams`, :func:`quantize.tokenizer_export.write_vocab` over the real Qwen2.5
tokenizer), and the tensor data is drawn from a pool of normal(0, 0.02) float16 values (each tensor starts at its own
random place in the pool; norms are 1, biases 0). A Q4_K_M file is made from that F16 file by llama.cpp's own
quantizer (:func:`quantize.llama_quantize.quantize_gguf`), so its per-tensor types are llama.cpp's Q4_K_M recipe.

Random weights never close ``</think>``: every pair runs to its budget, so every engine does the same work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize.architectures import arch_spec, read_hparams, write_hparams
from quantize.fixtures.hf_tokenizer import QWEN2, write_hf_tokenizer
from quantize.fixtures.registry import FIXTURES, fixture_cache_dir
from quantize.fixtures.vocab_files import vocab_gguf_path
from quantize.llama_quantize import quantize_gguf
from quantize.tokenizer_export import write_vocab

logger = logging.getLogger(__name__)

_QWEN25 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
               max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643, hidden_act="silu",
               use_sliding_window=False)
# config.json of each shape (Qwen2.5 0.5B and 7B are the bases of rank1-0.5b and rank1-7b)
SHAPES: dict[str, dict[str, Any]] = {
    "rank1-0.5b": dict(_QWEN25, **{k: v for k, v in FIXTURES["rank1-0.5b-shape"].shape.config.items()
                                   if k not in _QWEN25}),
    "rank1-7b": dict(_QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # the rehearsal's stand-in for both: the behaving fixture's size
    "tiny": dict(_QWEN25, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
TYPES = ("F16", "Q4_K_M")
_POOL = 1 << 24  # float16 values (32 MB) every weight tensor is cut from
_STD = 0.02


def checkpoint_folder(shape: str, out_dir: Path) -> Path:
    """``out_dir/random-<shape>``: ``config.json`` and the Qwen2.5 tokenizer files (no weights), what the exporter
    reads metadata from and what the transformers backend loads its tokenizer and config from. The tokenizer is
    built once per ``out_dir`` (reading llama.cpp's vocab file takes seconds)."""
    tokenizer = out_dir / "qwen2-tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        part = out_dir / f".qwen2-tokenizer.{os.getpid()}"
        shutil.rmtree(part, ignore_errors=True)
        write_hf_tokenizer(QWEN2, vocab_gguf_path(QWEN2.vocab_gguf, fixture_cache_dir()), part)
        shutil.rmtree(tokenizer, ignore_errors=True)
        part.rename(tokenizer)
    folder = out_dir / f"random-{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, folder / name)
    (folder / "config.json").write_text(json.dumps(SHAPES[shape], indent=2) + "\n")
    return folder


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (rows, columns) of a Qwen2 model."""
    hp = read_hparams(config)
    q, kv = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {"output_norm.weight": (hp.hidden_size,)}
    if not hp.tie_word_embeddings:
        shapes["output.weight"] = (hp.vocab_size, hp.hidden_size)
    shapes["token_embd.weight"] = (hp.vocab_size, hp.hidden_size)
    for i in range(hp.n_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_k.bias": (kv,), b + "attn_k.weight": (kv, hp.hidden_size),
                       b + "attn_norm.weight": (hp.hidden_size,), b + "attn_output.weight": (hp.hidden_size, q),
                       b + "attn_q.bias": (q,), b + "attn_q.weight": (q, hp.hidden_size),
                       b + "attn_v.bias": (kv,), b + "attn_v.weight": (kv, hp.hidden_size),
                       b + "ffn_down.weight": (hp.hidden_size, hp.ffn_size),
                       b + "ffn_gate.weight": (hp.ffn_size, hp.hidden_size),
                       b + "ffn_norm.weight": (hp.hidden_size,), b + "ffn_up.weight": (hp.ffn_size, hp.hidden_size)})
    return shapes


def _data(name: str, shape: tuple[int, ...], pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 1:
        return np.full(shape, 1.0 if name.endswith("norm.weight") else 0.0, dtype=np.float32)
    n = int(np.prod(shape))
    start = int(rng.integers(0, len(pool)))
    parts, left = [pool[start:start + n]], n - min(n, len(pool) - start)
    while left > 0:
        parts.append(pool[:left])
        left -= len(parts[-1])
    return np.concatenate(parts).reshape(shape)


def _part(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (no fsync: these files are scratch)."""
    return path.with_name(path.name + ".part")


def write_random_f16(shape: str, path: Path, *, seed: int = 0) -> Path:
    """Write a random-weight F16 GGUF of ``shape`` to ``path`` (renamed into place when complete)."""
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(_POOL, dtype=np.float32) * _STD).astype(np.float16)
    folder = checkpoint_folder(shape, path.parent)
    config = SHAPES[shape]
    spec, hp = arch_spec(config), read_hparams(config)
    shapes = tensor_shapes(config)
    part = _part(path)
    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_name)
    try:
        writer.add_name(f"random-{shape}")
        write_hparams(writer, spec, hp)
        write_vocab(writer, folder, hp.vocab_size)
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, dims in shapes.items():
            dtype = np.float32 if len(dims) == 1 else np.float16
            writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
        writer.write_header_to_file(part)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, dims in shapes.items():
            writer.write_tensor_data(_data(name, dims, pool, rng))
    finally:
        writer.close()
    part.replace(path)
    return path


def random_gguf(shape: str, gguf_type: str, out_dir: Path, *, threads: int | None = None) -> tuple[Path, float]:
    """The random GGUF of ``shape`` in ``gguf_type`` (F16, or Q4_K_M quantized from the F16 by llama.cpp) in
    ``out_dir``, written once; its path and the seconds it took (0 when it was already there)."""
    if gguf_type not in TYPES:
        raise ValueError(f"random GGUFs are written as {', '.join(TYPES)}, not {gguf_type}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"random-{shape}-{gguf_type}.gguf"
    if target.is_file():
        return target, 0.0
    start = time.perf_counter()
    f16 = out_dir / f"random-{shape}-F16.gguf"
    if not f16.is_file():
        write_random_f16(shape, f16)
    if gguf_type != "F16":
        quantize_gguf(f16, _part(target), gguf_type, threads=threads)
        _part(target).replace(target)
    return target, time.perf_counter() - start
