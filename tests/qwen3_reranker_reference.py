"""An independent reference for Qwen3-Reranker scores: the official model card's transformers example, re-typed.

Source: the "Transformers Usage" of the Qwen3-Reranker model card (huggingface.co/Qwen/Qwen3-Reranker-0.6B; the same
code is in the README of github.com/QwenLM/Qwen3-Embedding). Its steps, kept as they are there:

- ``format_instruction``: ``"<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}"``, the instruction
  defaulting to "Given a web search query, retrieve relevant passages that answer the query";
- ``process_inputs``: the tokenizer (left padding) encodes the formatted pairs, truncated to ``max_length`` minus the
  prefix and suffix, then each pair's ids become ``prefix_tokens + ids + suffix_tokens`` and the batch is padded;
- ``compute_logits``: the logits of the last position, those of "no" and "yes" stacked, a log-softmax over the two,
  and exp of the "yes" one: P("yes") / (P("yes") + P("no")).

It imports nothing from rank1_local or quantize: it judges them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
        instruction=instruction, query=query, doc=doc)


class Qwen3RerankerReference:
    """The card's tokenizer, model and steps, in float32 on the CPU by default."""

    def __init__(self, model_dir: str | Path, *, max_length: int = 8192, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        self.prefix_tokens = self.tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(SUFFIX, add_special_tokens=False)

    def process_inputs(self, pairs: list[str]) -> dict:
        inputs = self.tokenizer(
            pairs, padding=False, truncation="longest_first", return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens))
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        return self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)

    @torch.no_grad()
    def compute_logits(self, inputs: dict) -> list[float]:
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        return batch_scores[:, 1].exp().tolist()

    def input_ids(self, query: str, doc: str, instruction: str | None = None) -> list[int]:
        """One pair's token ids, as ``process_inputs`` makes them (before padding)."""
        return self.process_inputs([format_instruction(instruction, query, doc)])["input_ids"][0].tolist()

    def scores(self, pairs: list[tuple[str, str]], instruction: str | None = None, *,
               batch_size: int = 16) -> list[float]:
        """The card's scores of (query, document) pairs under ``instruction`` (None: the card's default), in batches
        of ``batch_size`` pairs."""
        texts = [format_instruction(instruction, query, doc) for query, doc in pairs]
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            out += self.compute_logits(self.process_inputs(texts[start:start + batch_size]))
        return out
