"""Model cards: what makes a generative reranker itself — its prompt, its answer tokens, how the score is read, and
whether it reasons first — as plain data beside the one runtime every card shares (export, the continuous batch,
the server, the cache, bundles, the framework classes, Ray).

- ``rank1``: think, close the reasoning with ``</think>``, answer `` true`` / `` false``; scored under the official
  protocol (:class:`~rank1_local.core.decoder.PairDecoder`). The prompt, dataset prompts and instructions are
  :mod:`rank1_local.core.prompt`'s, byte for byte the official code's.
- ``qwen3-reranker``: Qwen3-Reranker (0.6B, 4B, 8B). No reasoning: the answer is read at the last prompt position,
  P("yes") / (P("yes") + P("no")), exactly as the official model card's transformers example computes it: its system
  prompt and chat frame, ``<Instruct>: …\\n<Query>: …\\n<Document>: …`` with its default instruction, the three parts
  tokenized one by one (no special tokens added) and joined, the middle one cut from the right when the whole would
  not fit the context.

A card is recognised from the model's own facts (:func:`recognise_card`: its GGUF metadata or Hugging Face config,
else its name), and ``card=`` / ``--card`` overrides that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rank1_local.core.errors import UnsupportedModelError
from rank1_local.core.prompt import PASSAGE_SEPARATOR, PROMPT_HEAD, THINK_OPEN

REASONING, PREFILL = "reasoning", "prefill"


@dataclass(frozen=True)
class ModelCard:
    """One family of generative rerankers.

    ``head`` + query + ``middle`` + passage + ``tail`` is the prompt; ``split`` says whether the three spans
    (head; query, middle and passage; tail) are tokenized apart and joined (Qwen3-Reranker's official code does so)
    or the whole text at once (rank1). ``answers`` are the positive and negative answer tokens' texts."""

    name: str
    mode: str  # REASONING (think, then answer under the official protocol) or PREFILL (the answer at the last position)
    answers: tuple[str, str]
    head: str
    middle: str
    tail: str
    split: bool = False
    default_instruction: str | None = None  # PREFILL cards: the instruction when a pair has none
    instruction_head: str = ""  # PREFILL cards: the text before the instruction, and between it and the query
    instruction_tail: str = ""
    truncates: bool = False  # the official code cuts a prompt that does not fit (rank1's scores 0.5)
    dataset_prompts: bool = False  # --dataset applies (the rank1 evaluation's dataset prompts)
    description: str = ""

    @property
    def reasons(self) -> bool:
        return self.mode == REASONING

    def query_text(self, query: str, instruction: str | None) -> str:
        """The query as it stands in a PREFILL card's prompt (with its instruction, or the default)."""
        instruction = instruction if instruction is not None else self.default_instruction
        return f"{self.instruction_head}{instruction}{self.instruction_tail}{query}"

    def spans(self, query: str, passage: str) -> tuple[str, str, str]:
        """The prompt's three spans for an already formatted query and a passage."""
        return self.head, query + self.middle + passage, self.tail

    def prompt(self, query: str, passage: str) -> str:
        return "".join(self.spans(query, passage))

    def shared_text(self, query: str) -> tuple[str, str]:
        """The text every passage of ``query`` shares: (the head span, the start of the middle span)."""
        return self.head, query + self.middle


RANK1 = ModelCard(
    name="rank1", mode=REASONING, answers=(" true", " false"), head=PROMPT_HEAD, middle=PASSAGE_SEPARATOR,
    tail=THINK_OPEN, dataset_prompts=True,
    description="rank1 (Qwen2.5, Llama-3.1, Mistral): reasons, then answers true or false (the official protocol)")

QWEN3_SYSTEM = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

QWEN3_RERANKER = ModelCard(
    name="qwen3-reranker", mode=PREFILL, answers=("yes", "no"), head=QWEN3_SYSTEM, middle="\n<Document>: ",
    tail=QWEN3_SUFFIX, split=True, default_instruction=QWEN3_INSTRUCTION, instruction_head="<Instruct>: ",
    instruction_tail="\n<Query>: ", truncates=True,
    description="Qwen3-Reranker (0.6B, 4B, 8B): answers yes or no at once (its model card's scoring)")

CARDS: dict[str, ModelCard] = {card.name: card for card in (RANK1, QWEN3_RERANKER)}


def card_named(name: str) -> ModelCard:
    card = CARDS.get(name.strip().lower())
    if card is None:
        raise UnsupportedModelError(f"no model card {name!r}; the cards are: "
                                    + "; ".join(f"{c.name} ({c.description})" for c in CARDS.values()))
    return card


def metadata_card(gguf_metadata: Mapping[str, Any]) -> ModelCard | None:
    """The card a GGUF's metadata plainly shows, whatever its names say: a Qwen3 with rank pooling (the classifier
    head that llama.cpp's converter and ours write for Qwen3-Reranker) is Qwen3-Reranker. None when the metadata
    shows none: a plain model may be run under any card."""
    arch = str(gguf_metadata.get("general.architecture", ""))
    return QWEN3_RERANKER if arch == "qwen3" and gguf_metadata.get(f"{arch}.pooling_type") == 4 else None


def recognise_card(*, gguf_metadata: Mapping[str, Any] | None = None, hf_config: Mapping[str, Any] | None = None,
                   name: str = "") -> ModelCard:
    """The card of a model from what it says about itself: a Qwen3 model whose GGUF says it is a reranker (pooling
    type rank, as llama.cpp's converter and ours write for Qwen3-Reranker) or whose name says so is Qwen3-Reranker;
    every other model is taken for rank1 (whose answer tokens are then checked when it loads)."""
    words = name.lower()
    if gguf_metadata:
        arch = str(gguf_metadata.get("general.architecture", ""))
        words += " " + " ".join(str(gguf_metadata.get(k, "")) for k in ("general.name", "general.basename",
                                                                        "general.finetune")).lower()
        if metadata_card(gguf_metadata) is QWEN3_RERANKER or (arch == "qwen3" and "reranker" in words):
            return QWEN3_RERANKER
    if hf_config:
        architectures = hf_config.get("architectures") or []
        words += " " + str(hf_config.get("_name_or_path", "")).lower()
        if any(str(a).startswith("Qwen3") for a in architectures) and "reranker" in words:
            return QWEN3_RERANKER
    if "qwen3-reranker" in words or "qwen3_reranker" in words:
        return QWEN3_RERANKER
    return RANK1
