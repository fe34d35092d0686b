"""Our exports hold what llama.cpp's own converter (``convert_hf_to_gguf.py``, from the llama-cpp-python sdist) writes.

Compared tensor by tensor (name, type, shape and every byte) and key by key. What may differ is listed, each for a
reason: the naming keys the converter derives from a folder name (``general.name``, ``general.basename``,
``general.finetune``, ``general.size_label``, ``general.type``), the ``<arch>.vocab_size`` we add, the order of
tensors and keys in the file, and, for an untied Qwen3-Reranker, the ``output.weight`` we keep (llama.cpp's converter
turns the LM head into the rerank classifier only; see quantize/rerank_head.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

NAMING_KEYS = {"general.name", "general.basename", "general.finetune", "general.size_label", "general.type"}
# header counts, which follow from the tensors and keys compared
COUNT_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def gguf_contents(path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (type, shape, bytes)) of a GGUF file."""
    reader = GGUFReader(path)
    kv = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.asarray(t.data).tobytes())
               for t in reader.tensors}
    return kv, tensors


def assert_same_model(ours, theirs, *, extra_tensors: frozenset[str] = frozenset()) -> dict:
    """Every tensor and key of llama.cpp's file is in ours, equal; ours has only ``extra_tensors`` and the vocab size
    besides. Returns our keys (for further checks)."""
    kv, tensors = gguf_contents(ours)
    their_kv, their_tensors = gguf_contents(theirs)
    arch = kv["general.architecture"]
    assert set(tensors) - set(their_tensors) == set(extra_tensors)
    assert set(their_tensors) <= set(tensors)
    for name, (ttype, shape, data) in their_tensors.items():
        assert tensors[name][:2] == (ttype, shape), name
        assert tensors[name][2] == data, f"{name}: other bytes"
    ignored = NAMING_KEYS | COUNT_KEYS
    assert set(kv) - ignored - set(their_kv) == {f"{arch}.vocab_size"}
    assert set(their_kv) - ignored <= set(kv)
    for key in set(their_kv) - ignored:
        assert kv[key] == their_kv[key], key
    return kv


@pytest.mark.parametrize("name, gguf_type", [("qwen2-tied", "F16"), ("qwen3", "F16")])
def test_export_equals_llama_cpps_conversion(name, gguf_type, fixture_dir, exported, converted_by_llama_cpp):
    """Qwen2 (q/k/v biases, tied) and Qwen3 (q_norm/k_norm, no biases, head_dim 128 twice hidden/heads, untied)."""
    kv = assert_same_model(exported(name, gguf_type), converted_by_llama_cpp(fixture_dir(name), gguf_type.lower()))
    if name == "qwen3":
        assert kv["qwen3.attention.key_length"] == kv["qwen3.attention.value_length"] == 128
        assert "qwen3.pooling_type" not in kv  # not a reranker


def test_reranker_export_equals_llama_cpps_conversion(fixture_dir, exported, converted_by_llama_cpp):
    """A tied Qwen3-Reranker (like 0.6B and 4B), recognised by its name by both: the classifier llama-server needs
    (the LM head's "yes" and "no" rows), rank pooling, the labels and the rerank prompt, all as llama.cpp writes
    them."""
    folder = fixture_dir("qwen3-reranker-behaving")
    kv = assert_same_model(exported("qwen3-reranker-behaving", "F32"), converted_by_llama_cpp(folder, "f32"))
    assert kv["qwen3.pooling_type"] == 4  # RANK
    assert kv["qwen3.classifier.output_labels"] == ["yes", "no"]
    assert kv["tokenizer.chat_templates"] == ["rerank"]
    assert "{query}" in kv["tokenizer.chat_template.rerank"] and "{document}" in kv["tokenizer.chat_template.rerank"]
    reader = GGUFReader(exported("qwen3-reranker-behaving", "F32"))
    head = next(t for t in reader.tensors if t.name == "cls.output.weight")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(head.data), np.asarray(embedding.data)[[9693, 2152]])  # yes, no


def test_untied_reranker_keeps_its_lm_head(fixture_dir, tmp_path, converted_by_llama_cpp):
    """An untied Qwen3-Reranker (like 8B), here the qwen3 fixture in a folder named like one: the classifier comes
    from lm_head, as llama.cpp's converter makes it; we also keep output.weight, which that converter drops."""
    from quantize.gguf_export import export_gguf

    folder = tmp_path / "my-Qwen3-Reranker-untied"
    folder.mkdir()
    for f in fixture_dir("qwen3").iterdir():
        (folder / f.name).symlink_to(f)
    (ours,) = export_gguf(folder, tmp_path / "out", "F16", progress=False)
    theirs = converted_by_llama_cpp(folder, "f16")
    kv = assert_same_model(ours.path, theirs, extra_tensors=frozenset({"output.weight"}))
    assert kv["qwen3.pooling_type"] == 4
