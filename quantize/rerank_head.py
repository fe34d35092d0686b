"""Qwen3-Reranker GGUFs that ``llama-server --reranking`` serves, written as llama.cpp's own converter writes them.

llama.cpp scores a Qwen3-Reranker through a classification head made at conversion (``convert_hf_to_gguf.py``,
``Qwen3Model``); a GGUF without it gets meaningless rerank scores. For a checkpoint recognised as a Qwen3-Reranker we
write what that converter writes:

- the tensor ``cls.output.weight``: the LM head's rows of "yes" and "no", in that order (the embedding's rows when the
  embeddings are tied);
- ``qwen3.pooling_type`` = RANK and ``qwen3.classifier.output_labels`` = ["yes", "no"];
- the chat template named ``rerank`` (``tokenizer.chat_template.rerank``, listed in ``tokenizer.chat_templates``): the
  model card's prompt with its default instruction, which llama-server fills with ``{query}`` and ``{document}``.

llama.cpp then takes the hidden state of a prompt's last position through ``cls.output`` and a softmax: the first
output is P("yes") / (P("yes") + P("no")), the model card's score.

One difference, on purpose: for an untied model (Qwen3-Reranker-8B) llama.cpp's converter writes the LM head only as
that classifier and drops ``output.weight`` (llama.cpp then reuses the embedding as LM head). We keep it, so the file
stays a correct language model (the yes/no logits of a prefill runtime, generation); llama-server ignores it. Our
runtime refuses such a llama.cpp conversion (:mod:`rank1_local.models.output_layer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from quantize.architectures import ArchSpec, HParams
from quantize.checkpoint import Checkpoint
from quantize.tokenizer_export import read_vocab
from rank1_local.core.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

CLS_OUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT] + ".weight"
LABELS = ("yes", "no")  # the classifier's outputs: llama-server's score is the first
# The prompt llama.cpp's converter stores for llama-server (query and document replace {query} and {document}): the
# model card's prefix, format_instruction with the card's default instruction, and suffix, as one string.
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
# What names a Qwen3-Reranker (case-insensitive), in the checkpoint's name or config.json's _name_or_path, or as a
# heading in its README.md (the model card): the rule of llama.cpp's converter
NAME_HINT = "qwen3-reranker"
README_HINT = "# qwen3-reranker"


def recognise(checkpoint: Checkpoint) -> str | None:
    """Why ``checkpoint`` is taken for a Qwen3-Reranker (None when it is not): its name (the folder's, or the hub id's
    for a hub download), config.json's ``_name_or_path``, or a ``# Qwen3-Reranker…`` heading in its README.md."""
    for where, text in (("name", checkpoint.name), ("config.json _name_or_path",
                                                    str(checkpoint.config.get("_name_or_path") or ""))):
        if NAME_HINT in text.lower():
            return f"its {where} {text!r} names a Qwen3-Reranker"
    readme = checkpoint.path / "README.md"
    if readme.is_file() and README_HINT in readme.read_text(encoding="utf-8", errors="replace").lower():
        return "its README.md is a Qwen3-Reranker model card"
    return None


@dataclass(frozen=True)
class RerankHead:
    """The classifier llama-server needs: the LM-head rows it is cut from, and why the export writes it."""

    source: str  # the checkpoint tensor holding the LM head
    yes_id: int
    no_id: int
    reason: str

    @property
    def rows(self) -> np.ndarray:
        return np.asarray([self.yes_id, self.no_id], dtype=np.int64)


def _token_id(model_dir: Path, vocab: list[str], text: str) -> int:
    try:
        return vocab.index(text)
    except ValueError:
        raise UnsupportedModelError(f"{model_dir}: the tokenizer has no token {text!r}, so no Qwen3-Reranker "
                                    "classifier can be made from the LM head") from None


def plan_rerank_head(checkpoint: Checkpoint, spec: ArchSpec, hp: HParams, rerank: bool | None) -> RerankHead | None:
    """The rerank head to write: when ``rerank`` is True, or None and the checkpoint is recognised as a
    Qwen3-Reranker; None otherwise."""
    if rerank is False:
        return None
    reason = "asked for (--rerank)" if rerank else recognise(checkpoint)
    if reason is None:
        return None
    if spec.gguf_arch != gguf.MODEL_ARCH.QWEN3:
        raise UnsupportedModelError(f"{checkpoint.path}: a rerank head is written for Qwen3-Reranker checkpoints "
                                    f"(Qwen3ForCausalLM) only, this is a {spec.hf_architecture}")
    vocab = read_vocab(checkpoint.path, hp.vocab_size).tokens
    source = "model.embed_tokens.weight" if hp.tie_word_embeddings else "lm_head.weight"
    head = RerankHead(source, _token_id(checkpoint.path, vocab, LABELS[0]),
                      _token_id(checkpoint.path, vocab, LABELS[1]), reason)
    logger.info("%s: Qwen3-Reranker (%s): writing llama-server's rerank head (%s rows %d and %d)", checkpoint.name,
                reason, source, head.yes_id, head.no_id)
    return head


def write_rerank_metadata(writer: gguf.GGUFWriter) -> None:
    """The metadata llama.cpp reads for a Qwen3-Reranker: rank pooling, the classifier's labels, the rerank prompt."""
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels(list(LABELS))
    writer.add_chat_template([{"name": "rerank", "template": RERANK_TEMPLATE}])
