"""The fixture checkpoints are real: real tokenizers, real architectures, the family's structure."""

from __future__ import annotations

import json

import pytest

from quantize.checkpoint import open_checkpoint
from quantize.fixtures.hf_tokenizer import LLAMA3, QWEN2, QWEN3

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("flavor", [QWEN2, QWEN3, LLAMA3], ids=lambda f: f.name)
def test_tokenizer_reproduces_llama_cpp_reference_ids(flavor, fixture_dir, vocab_test_file):
    """llama.cpp's .inp/.out files hold texts and the ids the original HF tokenizer gave them (Qwen3's tokenizer is
    Qwen2's vocabulary and merges)."""
    name = {"qwen2": "qwen2-tied", "qwen3": "qwen3", "llama3": "llama3"}[flavor.name]
    tok = transformers.AutoTokenizer.from_pretrained(fixture_dir(name))
    texts = vocab_test_file(flavor.vocab_gguf, ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = vocab_test_file(flavor.vocab_gguf, ".out").read_text(encoding="utf-8").split("\n")
    assert len(texts) >= 40 and len(texts) == len(expected)
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text, add_special_tokens=False) == [int(x) for x in ids.split()], repr(text)


def test_rank1_answer_token_ids(fixture_dir):
    tok = transformers.AutoTokenizer.from_pretrained(fixture_dir("qwen2-tied"))
    assert tok.encode(" true") == [830]
    assert tok.encode(" false") == [895]
    assert tok.encode("</think>") == tok.encode("</") + tok.encode("think") + tok.encode(">")
    assert tok.convert_ids_to_tokens(151643) == "<|endoftext|>"
    assert tok.convert_ids_to_tokens(151664) == "<|file_sep|>"


def test_qwen3_tokens(fixture_dir):
    """Qwen3's added tokens after Qwen2.5's, none of them special (Qwen3's tokenizer_config.json), its end of turn,
    and the Qwen3-Reranker's answer tokens and empty think block."""
    tok = transformers.AutoTokenizer.from_pretrained(fixture_dir("qwen3"))
    added = {text: i for text, i in tok.get_added_vocab().items() if i >= 151665}
    assert added == {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}
    assert not {"<think>", "</think>"} & set(tok.all_special_tokens)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.convert_tokens_to_ids(["yes", "no"]) == [9693, 2152]
    assert tok.encode("<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]


def test_family_structure(fixture_dir):
    tied = open_checkpoint(fixture_dir("qwen2-tied"))
    assert tied.config["tie_word_embeddings"] and "lm_head.weight" not in tied.tensors
    assert "model.layers.0.self_attn.q_proj.bias" in tied.tensors
    assert tied.source_dtype == "BF16"
    assert tied.config["hidden_size"] % 256 == 0 and tied.config["intermediate_size"] % 256 == 0

    sharded_dir = fixture_dir("qwen2-untied-sharded")
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    untied = open_checkpoint(sharded_dir)
    assert "lm_head.weight" in untied.tensors and untied.config["vocab_size"] == 152064

    llama = open_checkpoint(fixture_dir("llama3"))
    assert llama.config["rope_scaling"]["rope_type"] == "llama3"
    mistral = open_checkpoint(fixture_dir("mistral"))
    assert mistral.config["head_dim"] * mistral.config["num_attention_heads"] != mistral.config["hidden_size"]

    qwen3 = open_checkpoint(fixture_dir("qwen3"))
    assert qwen3.config["head_dim"] * qwen3.config["num_attention_heads"] == 2 * qwen3.config["hidden_size"]
    assert qwen3.tensors["model.layers.1.self_attn.q_norm.weight"].shape == (qwen3.config["head_dim"],)
    assert "model.layers.0.self_attn.k_norm.weight" in qwen3.tensors and "lm_head.weight" in qwen3.tensors
    assert not any(name.endswith(".bias") for name in qwen3.tensors)
    reranker = open_checkpoint(fixture_dir("qwen3-reranker-behaving"))
    assert reranker.architecture == "Qwen3ForCausalLM" and reranker.config["tie_word_embeddings"]
    assert "lm_head.weight" not in reranker.tensors


def test_fixture_build_is_deterministic(tmp_path, fixture_dir, monkeypatch):
    """Rebuilding a random fixture from scratch gives byte-identical weights."""
    from quantize.fixtures import build_fixture, fixture_cache_dir

    monkeypatch.setenv("RANK1_VOCAB_DIR", str(fixture_cache_dir() / "vocab"))
    cached = fixture_dir("qwen2-tied")
    rebuilt = build_fixture("qwen2-tied", cache_dir=tmp_path)
    shards = sorted(cached.glob("*.safetensors"))
    assert shards
    for shard in shards:
        assert (rebuilt / shard.name).read_bytes() == shard.read_bytes()


def test_training_leaves_the_callers_thread_count_alone(fixture_dir):
    """The behaving fixture trains on a fixed 2 threads and puts the caller's setting back afterwards."""
    import torch

    from quantize.fixtures.behaving import train
    from quantize.fixtures.checkpoints import make_config
    from quantize.fixtures.registry import FIXTURES

    tokenizer = transformers.AutoTokenizer.from_pretrained(fixture_dir("behaving"))
    model = transformers.Qwen2ForCausalLM(make_config(FIXTURES["behaving"].shape))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, tokenizer, seed=0, steps=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_build_that_gives_other_weights_than_recorded_is_refused(tmp_path, fixture_dir, monkeypatch):
    """Every build is checked against the weights digest recorded in the repository: a builder that gave other bits
    on some machine fails loudly instead of handing the tests a different model."""
    from quantize.fixtures import build_fixture, fixture_cache_dir, registry
    from rank1_local.core.errors import Rank1Error

    monkeypatch.setenv("RANK1_VOCAB_DIR", str(fixture_cache_dir() / "vocab"))
    fixture_dir("qwen2-tied")  # the vocab files are fetched
    monkeypatch.setattr(registry, "expected_weights", lambda: {"qwen2-tied": "0" * 64})
    with pytest.raises(Rank1Error, match="not the recorded"):
        build_fixture("qwen2-tied", cache_dir=tmp_path)
    assert not any(tmp_path.glob("qwen2-tied-*")) and not any(tmp_path.glob(".qwen2-tied*"))


def test_trained_fixtures_are_rebuilt_from_the_shipped_weights(fixture_dir):
    """The trained fixtures are not trained here: they are rebuilt from quantize/fixtures/data, and their digest
    is the one recorded when they were trained."""
    from quantize.fixtures.checkpoints import weights_digest
    from quantize.fixtures.registry import expected_weights
    from quantize.fixtures.trained import trained_metadata

    for name in ("behaving", "behaving-think", "qwen3-reranker-behaving"):
        folder = fixture_dir(name)
        recorded = json.loads((folder / "fixture.json").read_text())
        assert weights_digest(folder) == recorded["weights_sha256"] == expected_weights()[name]
        assert trained_metadata(name)["weights_sha256"] == recorded["weights_sha256"]
