"""GGUFs whose output layer llama.cpp would take from the token embedding although the model's LM head is not it.

llama.cpp's converter (``convert_hf_to_gguf.py``, ``Qwen3Model``) writes a Qwen3-Reranker's LM-head rows of "yes" and
"no" as a rank head, ``cls.output.weight`` (labels ``yes``, ``no``, in that order), for ``llama-server --reranking``.
For a tied model (Qwen3-Reranker-0.6B, 4B) those rows are the embedding's, and the embedding is written as usual. For
an untied one (``tie_word_embeddings`` false: Qwen3-Reranker-8B) it writes the LM head *only* as that rank head: the
file has no ``output.weight``, and llama.cpp then takes the token embedding for the output layer. A runtime that reads
the answer logits at the last position (ours) would read the embedding's rows of "yes" and "no", not the model's:
wrong scores, without an error.

:func:`check_output_layer` tells the two apart from the file alone: in a GGUF with a rank head and no
``output.weight``, the head's rows must be the embedding's rows of the head's labels, up to the rounding of the two
tensors' types; otherwise the file is refused, naming the export that keeps the LM head. Two rows of each tensor are
read, nothing else of the weights.

Scoring such a file through its rank head instead (the final hidden state times the head's rows) would need llama.cpp's
embeddings output for every pair, which the continuous batch does not run: refused, not approximated.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from rank1_local.core.errors import UnsupportedModelError
from rank1_local.models.gguf_file import GgufLayout, GgufTensor, read_gguf_layout
from rank1_local.models.model_files import split_name

logger = logging.getLogger(__name__)

RANK_HEAD = "cls.output.weight"  # llama.cpp's LLM_TENSOR_CLS_OUT
OUTPUT, TOKEN_EMBD = "output.weight", "token_embd.weight"
TOKENS = "tokenizer.ggml.tokens"
DEFAULT_LABELS = ("yes", "no")  # the labels llama.cpp's converter writes for a Qwen3-Reranker
# The relative error of one weight stored in a float type (half a unit in the last place of its significand)
FLOAT_ROUNDING = {0: 2.0**-24, 1: 2.0**-11, 30: 2.0**-8}  # F32, F16, BF16
SLACK = 3.0  # how many times the types' rounding two copies of one row may differ by
MOST = 0.5  # rows further apart than half their norm are not one row, whatever the types


def rounding(ggml_type: int) -> float:
    """About the relative error of a weight stored as ``ggml_type``: its significand's for a float type, 2 ** -(b - 1)
    for a quantized one of b bits a weight (a generous bound: Q8_0 0.6 %, Q4_K 9 %, Q2_K 32 %)."""
    import gguf

    if ggml_type in FLOAT_ROUNDING:
        return FLOAT_ROUNDING[ggml_type]
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return 2.0 ** -(8 * type_size / block - 1)


def tolerance(a: int, b: int) -> float:
    """How far (relative to its norm) one row stored as type ``a`` and as type ``b`` may be from itself."""
    return min(MOST, SLACK * math.hypot(rounding(a), rounding(b)))


def _parts(path: Path) -> list[Path]:
    """Every part of a split GGUF given by its first part (all present), else ``[path]``."""
    split = split_name(path.name)
    if split is None or split.part != 1:
        return [path]
    parts = [path.with_name(split.part_name(i)) for i in range(1, split.total + 1)]
    return parts if all(p.is_file() for p in parts) else [path]


def _rows(path: Path, tensor: GgufTensor, rows: list[int]) -> np.ndarray:
    """``rows`` of a 2-D tensor, dequantized to float32 (one row per entry)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
    row_bytes = tensor.nbytes // tensor.dims[1]
    out = []
    with open(path, "rb") as f:
        for row in rows:
            f.seek(tensor.start + row * row_bytes)
            raw = np.frombuffer(f.read(row_bytes), dtype=np.uint8)
            out.append(gguf.quants.dequantize(raw, qtype).reshape(-1).astype(np.float32))
    return np.stack(out)


def check_output_layer(path: Path, layout: GgufLayout | None = None) -> None:
    """Refuse a GGUF (``path``, the first part of a split one) whose rank head's rows are not its token embedding's
    rows of the head's labels while it has no ``output.weight``: its LM head is missing (see the module's doc).
    ``layout`` is the first part's :func:`read_gguf_layout`, when read already."""
    parts = _parts(path)
    first = layout if layout is not None else read_gguf_layout(parts[0])
    where = {name: (part, tensor) for part, table in zip(parts, [first.tensors] + [read_gguf_layout(p).tensors
                                                                                  for p in parts[1:]], strict=True)
             for name, tensor in table.items()}
    if OUTPUT in where or RANK_HEAD not in where or TOKEN_EMBD not in where:
        return
    (head_part, head), (embd_part, embd) = where[RANK_HEAD], where[TOKEN_EMBD]
    label_key = f"{first.metadata.get('general.architecture', '')}.classifier.output_labels"
    metadata = read_gguf_layout(parts[0], arrays=(TOKENS, label_key)).metadata
    labels = list(metadata.get(label_key) or DEFAULT_LABELS)
    ids = {text: i for i, text in enumerate(metadata.get(TOKENS) or []) if text in labels}
    if (len(head.dims) != 2 or len(embd.dims) != 2 or head.dims[1] != len(labels)
            or not all(ids.get(t, embd.dims[-1]) < embd.dims[-1] for t in labels)):
        logger.warning("%s: a rank head without output.weight, but its labels %s are not single tokens of the "
                       "vocabulary: its output layer was not checked", path.name, labels)
        return
    try:
        head_rows = _rows(head_part, head, list(range(len(labels))))
        embd_rows = _rows(embd_part, embd, [ids[t] for t in labels])
    except NotImplementedError as exc:  # a type gguf-py cannot read yet
        logger.warning("%s: a rank head without output.weight, not checked (%s)", path.name, exc)
        return
    norms = np.maximum(np.linalg.norm(head_rows, axis=1), np.finfo(np.float32).tiny)
    apart = float(np.max(np.linalg.norm(embd_rows - head_rows, axis=1) / norms))
    allowed = tolerance(head.ggml_type, embd.ggml_type)
    logger.debug("%s: the rank head's rows of %s are %.3g of their norm from the token embedding's (%.3g allowed)",
                 path.name, labels, apart, allowed)
    if apart > allowed:
        raise UnsupportedModelError(
            f"{path.name}: its output layer is missing: an untied model (such as Qwen3-Reranker-8B) converted by "
            "llama.cpp's convert_hf_to_gguf.py, which writes the LM head only as the rank head (cls.output.weight) "
            f"and no output.weight (the head's rows of {' and '.join(repr(t) for t in labels)} are {apart:.2f} of "
            f"their norm from the token embedding's, {allowed:.2g} allowed by their types), so llama.cpp would read "
            "the embedding in its place; export the checkpoint with `rank1-quantize gguf`, which keeps output.weight")
