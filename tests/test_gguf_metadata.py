"""What the exporter writes is read back intact: hyper-parameters, tokenizer, and tensor types."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from quantize.architectures import llama3_rope_factors, read_hparams


def _fields(path):
    reader = GGUFReader(path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return reader, {k: f.contents() for k, f in reader.fields.items() if k not in big}


def _weight_types(reader) -> Counter:
    return Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)


def test_qwen2_metadata_round_trip(fixture_dir, exported):
    config = json.loads((fixture_dir("qwen2-tied") / "config.json").read_text())
    reader, kv = _fields(exported("qwen2-tied", "F16"))
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.context_length"] == config["max_position_embeddings"]
    assert kv["qwen2.embedding_length"] == config["hidden_size"]
    assert kv["qwen2.block_count"] == config["num_hidden_layers"]
    assert kv["qwen2.feed_forward_length"] == config["intermediate_size"]
    assert kv["qwen2.attention.head_count"] == config["num_attention_heads"]
    assert kv["qwen2.attention.head_count_kv"] == config["num_key_value_heads"]
    assert kv["qwen2.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert kv["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert kv["general.file_type"] == 1
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.ggml.eos_token_id"] == 151643
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == config["vocab_size"] and tokens[830] == "Ġtrue" and tokens[895] == "Ġfalse"
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == 151387
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings
    assert "blk.0.attn_q.bias" in names and "blk.1.attn_v.bias" in names


def test_untied_sharded_has_output_and_v5_config(fixture_dir, exported):
    config = json.loads((fixture_dir("qwen2-untied-sharded") / "config.json").read_text())
    assert "rope_parameters" in config  # written by transformers 5
    reader, kv = _fields(exported("qwen2-untied-sharded", "Q8_0"))
    assert kv["qwen2.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert "output.weight" in {t.name for t in reader.tensors}
    assert kv["qwen2.vocab_size"] == 152064


def test_llama3_rope_freqs_and_bos(fixture_dir, exported):
    config = json.loads((fixture_dir("llama3") / "config.json").read_text())
    reader, kv = _fields(exported("llama3", "Q8_0"))
    assert kv["general.architecture"] == "llama"
    assert kv["llama.rope.dimension_count"] == 64
    assert kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.bos_token_id"] == 128000
    rope = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    expected = llama3_rope_factors(read_hparams(config))
    np.testing.assert_allclose(np.asarray(rope.data), expected)
    assert expected.min() == 1.0 and expected.max() == 8.0  # both ends of the llama3 ramp occur


def test_mistral_head_dim(exported):
    reader, kv = _fields(exported("mistral", "Q8_0"))
    assert kv["llama.attention.key_length"] == 128 and kv["llama.attention.value_length"] == 128
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert tuple(int(x) for x in q.shape) == (256, 4 * 128)


@pytest.mark.parametrize("gguf_type, expected", [
    ("F32", {"F32"}), ("F16", {"F16"}), ("BF16", {"BF16"}), ("Q8_0", {"Q8_0"}),
    ("Q6_K", {"Q6_K"}), ("Q4_K_M", {"Q4_K", "Q6_K"}), ("Q3_K_M", {"Q3_K"}), ("Q2_K", {"Q2_K"}),
    ("IQ4_XS", {"IQ4_XS"}),
])
def test_requested_types_are_present(gguf_type, expected, exported):
    reader = GGUFReader(exported("qwen2-tied", gguf_type))
    types = _weight_types(reader)
    assert expected <= set(types), types
    main = max(types, key=types.__getitem__)
    assert main in expected
    # 1-D tensors (norms, biases) always stay F32
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 1} == {Q.F32}


def test_bf16_export_is_bit_exact(fixture_dir, exported):
    from quantize.checkpoint import open_checkpoint
    from quantize.safetensors_io import load_raw

    ckpt = open_checkpoint(fixture_dir("qwen2-tied"))
    reader = GGUFReader(exported("qwen2-tied", "BF16"))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    raw = load_raw(ckpt.tensors["model.embed_tokens.weight"])
    assert np.array_equal(np.asarray(emb.data).view(np.uint16).reshape(raw.shape), raw)
