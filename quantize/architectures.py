"""How each supported Hugging Face architecture maps onto a llama.cpp GGUF architecture.

Shapes and hyper-parameters are always read from the checkpoint's config.json (both the
transformers 4.x layout, ``rope_theta``/``rope_scaling``, and the 5.x ``rope_parameters`` one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from rank1_local.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    hf_architecture: str
    gguf_arch: gguf.MODEL_ARCH
    # HF Llama/Mistral store q/k rows in the rotate-half order; llama.cpp's llama arch wants the
    # interleaved (original Meta) order. Qwen2 and Qwen3 run NEOX rope in llama.cpp and need no permutation.
    permute_qk: bool
    # Qwen3: an RMS norm over each head's queries and keys (q_norm/k_norm, one weight of head_dim per layer)
    qk_norm: bool = False
    # write the key/value lengths whenever config.json states head_dim, as llama.cpp's converter does (Qwen3 configs
    # always state it); the other architectures write them only where head_dim differs from hidden/heads
    stated_head_dim: bool = False

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, ArchSpec] = {
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "Qwen3ForCausalLM": ArchSpec("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, permute_qk=False, qk_norm=True,
                                 stated_head_dim=True),
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
}


# GPTQ/AWQ exports (quantize.weight_quant) are made and tested for rank1's architectures only
WEIGHT_QUANT_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")


def arch_spec(config: dict[str, Any], supported: tuple[str, ...] | None = None) -> ArchSpec:
    """The architecture of ``config`` among ``supported`` (default: every one the GGUF exporter knows)."""
    known = supported or tuple(ARCHITECTURES)
    archs = config.get("architectures") or []
    for name in archs:
        if name in known:
            return ARCHITECTURES[name]
    found = ", ".join(archs) if archs else "none listed in config.json"
    raise UnsupportedModelError(f"unsupported architecture ({found}); rank1-local exports {', '.join(known)}")


@dataclass(frozen=True)
class HParams:
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    context_length: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool
    head_dim_stated: bool = False  # config.json names head_dim (rather than implying hidden/heads)


def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config or config[key] is None:
        raise UnsupportedModelError(f"config.json has no {key!r}")
    return config[key]


def read_hparams(config: dict[str, Any]) -> HParams:
    rope_params = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (rope_params if rope_params else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    hidden = int(_require(config, "hidden_size"))
    n_heads = int(_require(config, "num_attention_heads"))
    head_dim = config.get("head_dim") or hidden // n_heads
    return HParams(
        hidden_size=hidden,
        n_layers=int(_require(config, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        ffn_size=int(_require(config, "intermediate_size")),
        context_length=int(config.get("max_position_embeddings") or 4096),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        vocab_size=int(_require(config, "vocab_size")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim_stated=config.get("head_dim") is not None,
    )


def write_hparams(writer: gguf.GGUFWriter, spec: ArchSpec, hp: HParams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn_size)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(hp.vocab_size)
    if spec.gguf_arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.hidden_size // hp.n_heads or (spec.stated_head_dim and hp.head_dim_stated):
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    scaling = hp.rope_scaling
    if scaling is None:
        return
    kind = scaling["rope_type"]
    if kind == "llama3" and spec.gguf_arch == gguf.MODEL_ARCH.LLAMA:
        return  # expressed by the rope_freqs tensor (see extra_tensors)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    else:
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported for {spec.hf_architecture}")


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp's ``rope_freqs`` tensor."""
    s = hp.rope_scaling or {}
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def extra_tensors(spec: ArchSpec, hp: HParams) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint does not store."""
    if spec.gguf_arch == gguf.MODEL_ARCH.LLAMA and hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(hp)}
    return {}


def qk_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row gather index turning HF's rotate-half q/k layout into llama.cpp's interleaved one."""
    head_dim = n_rows // n_heads
    idx = np.arange(n_rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2)
    return idx.reshape(n_rows)
