"""The output-layer check on small hand-made GGUFs (no model, no torch): which files with a rank head and no
output.weight are refused, in one file and split in parts. The real case (a Qwen3-Reranker fixture made untied and
converted by llama.cpp's converter) is in tests/test_qwen3_reranker.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from rank1_local.core.errors import UnsupportedModelError
from rank1_local.models.output_layer import check_output_layer, tolerance

pytestmark = pytest.mark.quick

VOCAB = ["a", "no", "b", "yes", "c", "d"]
YES, NO = VOCAB.index("yes"), VOCAB.index("no")
N_EMBD = 64


def _write(path: Path, head_rows: list[int] | None, *, output: bool = False, noise: float = 0.0,
           qtype: gguf.GGMLQuantizationType | None = None, split_max_tensors: int = 0) -> Path:
    """A qwen3 GGUF with a token embedding and the rank head made of the embedding rows ``head_rows`` (plus relative
    ``noise``), optionally output.weight, its weights of ``qtype`` (float32 when None)."""
    rng = np.random.default_rng(0)
    embd = rng.standard_normal((len(VOCAB), N_EMBD)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "qwen3", split_max_tensors=split_max_tensors)
    writer.add_token_list(VOCAB)
    writer.add_classifier_output_labels(["yes", "no"])
    tensors = {"token_embd.weight": embd}
    if head_rows is not None:
        head = embd[head_rows]
        off = rng.standard_normal(head.shape) * np.linalg.norm(head, axis=1, keepdims=True) / np.sqrt(N_EMBD)
        tensors["cls.output.weight"] = (head + noise * off).astype(np.float32)
    if output:
        tensors["output.weight"] = embd
    for name, data in tensors.items():
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_head_of_the_embeddings_rows_passes(tmp_path):
    check_output_layer(_write(tmp_path / "tied.gguf", [YES, NO]))


@pytest.mark.parametrize("rows", [[NO, YES], [YES, 0], [4, 5]], ids=["swapped", "one-other", "others"])
def test_a_head_of_other_rows_without_output_is_refused(tmp_path, rows):
    with pytest.raises(UnsupportedModelError, match="its output layer is missing.*rank1-quantize gguf"):
        check_output_layer(_write(tmp_path / "untied.gguf", rows))


def test_with_output_weight_or_without_a_head_nothing_is_checked(tmp_path):
    check_output_layer(_write(tmp_path / "ours.gguf", [NO, YES], output=True))  # our export keeps the LM head
    check_output_layer(_write(tmp_path / "plain.gguf", None))


def test_rounding_of_the_types_is_allowed_and_no_more(tmp_path):
    """Quantized rows differ from themselves by their types' rounding: Q8_0 passes with a little noise, a head
    further off than its types allow is refused, and Q4_0 allows more than Q8_0."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    check_output_layer(_write(tmp_path / "q8.gguf", [YES, NO], noise=0.005, qtype=q8))
    with pytest.raises(UnsupportedModelError, match="output layer is missing"):
        check_output_layer(_write(tmp_path / "q8-off.gguf", [YES, NO], noise=0.1, qtype=q8))
    assert tolerance(q8, q8) < tolerance(gguf.GGMLQuantizationType.Q4_0, q8) <= 0.5
    assert tolerance(gguf.GGMLQuantizationType.IQ1_S, gguf.GGMLQuantizationType.IQ1_S) == 0.5


def test_a_split_file_is_checked_across_its_parts(tmp_path):
    """token_embd.weight and cls.output.weight in different parts of a split GGUF, given by its first part."""
    _write(tmp_path / "untied.gguf", [NO, YES], split_max_tensors=1)
    parts = sorted(tmp_path.glob("untied-*-of-*.gguf"))
    assert len(parts) == 2
    with pytest.raises(UnsupportedModelError, match="output layer is missing"):
        check_output_layer(parts[0])
