"""The official rank1 scoring, re-typed from orionw/rank1 (``rank1.py``) on vLLM alone: the judge of the vLLM tier.

It shares no code with the project it judges (it imports vLLM, transformers' tokenizer and the standard library, and
nothing else), so a bug in the project's protocol code cannot sit on both sides of a comparison.

The official flow, as ``rank1.predict`` runs it with ``force_rethink=0`` and no dataset prompt:

1. ``return_prompt``: ``"Determine if the following passage is relevant to the query. Answer only with 'true' or
   'false'.\\nQuery: {query}\\nPassage: {passage}\\n<think>"``; a passage given as a mapping is ``f"{title} {text}"``
   when it has a ``title`` key, else its ``text``.
2. ``_process_with_vllm``: one ``generate`` over every prompt with ``SamplingParams(temperature=0,
   max_tokens=max_output_tokens, logprobs=20, stop=["</think> true", "</think> false"], skip_special_tokens=False)``.
   Per output: the top-20 map of the last generated position (``logprobs[-1]``; when that raises, the pair is
   incomplete); both answers in it: score ``exp(t) / (exp(t) + exp(f))``; otherwise incomplete.
3. ``_fix_incomplete_responses``: every incomplete text is cut (``rstrip``; unless it ends in '.', '!' or '?', cut
   after the last of those if there is one; ``strip``), the prompt continued with ``"\\n" + cut + "\\n</think>"``, and
   one ``generate`` over all of them with ``SamplingParams(temperature=0, max_tokens=1, logprobs=20,
   allowed_token_ids=[true, false], skip_special_tokens=False)``; the score from that position's two answers, or
   0.5 when they are not both there (or reading them raises).

The answer ids are the official lookup: ``tokenizer(" true", add_special_tokens=False).input_ids[0]`` (and
``" false"``), with the checkpoint's own tokenizer (``AutoTokenizer``).

What the judge reports per pair (:class:`Judgment`). ``predict`` returns only the scores; the rest is read from the
same outputs: ``reasoning`` is the first generation's text before ``"</think>"`` (the official split), ``n_tokens``
its ``len(token_ids)`` (the end-of-sequence token included, as vLLM returns it). For a pair that goes through step 3
the official code keeps the forced step's text and token count in lists ``predict`` never returns; the judge keeps
the first generation's. ``forced``: the score came through step 3 for a prompt that ran; ``too_long``: the prompt
did not run at all (below). A pair's ``score`` is the official one in every case.

Deviations, each forced by today's vLLM (the official code pinned vLLM 0.7.2, whose V0 engine behaves otherwise):

- **Processed log-probabilities** (``logprobs_mode="processed_logprobs"``). vLLM 0.7.2 returned the log-probabilities
  after the logits processors, so in step 3 (``allowed_token_ids``) both answers were there, renormalised over the
  two. Today's default returns the raw ones, where the other answer can be missing from the top 20.
- **The context.** vLLM 0.7.2's scheduler did not refuse a prompt longer than ``max_model_len``: it logged "Input
  prompt (N tokens) is too long and exceeds limit of M", marked the request ignored and returned it with no text, no
  tokens and no log-probabilities; ``logprobs[-1]`` then raised, the pair went to step 3, its forced prompt (longer
  still) was ignored as well, and it scored 0.5. A prompt of exactly ``max_model_len`` tokens ran (the limit is
  ``> max_model_len``), and generation ended once the sequence was *longer* than ``max_model_len``: at most
  ``max_model_len + 1 - prompt`` tokens. Today's vLLM raises for a prompt of ``max_model_len`` tokens or more (for
  the whole ``generate`` call) and ends generation once the sequence *reaches* ``max_model_len``. The judge restores
  0.7.2: its engine is built with ``max_model_len = context_size + 1`` (so generation ends where 0.7.2 ended it, and
  a prompt of ``context_size`` tokens runs), and a prompt longer than ``context_size`` tokens (counted with the same
  tokenizer, as vLLM counts it) is not sent: its output is the ignored request's (empty). The same holds in step 3.
- **Prefix caching off** (``enable_prefix_caching=False``): vLLM 0.7.2's default; today's engine turns it on.
- **The KV cache size on vLLM's CPU build** (``kv_cache_memory_bytes``): ``gpu_memory_utilization=0.9`` would mean
  90% of host memory there. On CUDA the official setting is kept.
- ``use_tqdm=False``: no progress bars in the test log.

Not re-typed: ``force_rethink``. The official rethink loop references an undefined ``rethink_text`` and raises
``NameError`` whenever it runs, so the official code has no working rethink to judge; the project's budget forcing
(``rethink_rounds``) is its own design and is judged by the transformers reference (``tests/rank1_reference.py``).
Nor ``truncate_input`` (unused in the official code) or instructions (FollowIR), which the vLLM tier does not use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Judgment:
    """The official outcome of one pair (see the module docstring for each field)."""

    score: float
    reasoning: str
    n_tokens: int
    forced: bool
    too_long: bool


@dataclass(frozen=True)
class _Output:
    """What the official code reads from one vLLM completion (an ignored request: all empty)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[Mapping[int, Any], ...] = ()


def official_prompt(query: str, passage: str | Mapping[str, str]) -> str:
    """``return_prompt`` with no dataset prompt, after ``predict``'s passage formatting."""
    if isinstance(passage, Mapping):
        passage = f"{passage['title']} {passage['text']}" if "title" in passage else passage["text"]
    return ("Determine if the following passage is relevant to the query. "
            "Answer only with 'true' or 'false'.\n"
            f"Query: {query}\n"
            f"Passage: {passage}\n"
            "<think>")


def official_cut(text: str) -> str:
    """The sentence cut of ``_fix_incomplete_responses``."""
    text = text.rstrip()
    if not text.endswith((".", "!", "?")):
        last_punct = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
        if last_punct != -1:
            text = text[:last_punct + 1]
    return text.strip()


class OfficialJudge:
    """rank1's official scoring on one checkpoint, in one vLLM engine.

    Args:
        model_dir: the checkpoint folder.
        dtype: the official ``fp_options`` ("float16"), or "float32".
        context_size: the official ``context_size`` (``max_model_len`` in vLLM 0.7.2's sense).
        kv_cache_bytes: the KV cache on vLLM's CPU build (ignored on CUDA).
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float16", context_size: int = 16000,
                 kv_cache_bytes: int = 256 << 20) -> None:
        import vllm
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        self.vllm = vllm
        self.context_size = context_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.true_token = self.tokenizer(" true", add_special_tokens=False).input_ids[0]
        self.false_token = self.tokenizer(" false", add_special_tokens=False).input_ids[0]
        memory: dict[str, Any] = {"gpu_memory_utilization": 0.9}
        if current_platform.is_cpu():
            memory = {"kv_cache_memory_bytes": kv_cache_bytes}
        self.llm = vllm.LLM(model=str(model_dir), tensor_parallel_size=1, trust_remote_code=True,
                            max_model_len=context_size + 1, dtype=dtype, enable_prefix_caching=False,
                            logprobs_mode="processed_logprobs", **memory)

    def _generate(self, prompts: list[str], params: Any) -> list[_Output]:
        """``LLM.generate`` as vLLM 0.7.2 answered it: a prompt longer than the context comes back empty."""
        runs = [i for i, p in enumerate(prompts) if len(self.tokenizer(p).input_ids) <= self.context_size]
        outputs = [_Output() for _ in prompts]
        if runs:
            done = self.llm.generate([prompts[i] for i in runs], params, use_tqdm=False)
            for i, request in zip(runs, done, strict=True):
                out = request.outputs[0]
                outputs[i] = _Output(out.text, tuple(out.token_ids), tuple(out.logprobs or ()))
        return outputs

    def _score(self, final_logits: Mapping[int, Any]) -> float:
        true_score = math.exp(final_logits[self.true_token].logprob)
        false_score = math.exp(final_logits[self.false_token].logprob)
        return true_score / (true_score + false_score)

    def _fix_incomplete(self, prompts: list[str], texts: list[str]) -> list[float]:
        """Step 3: the forced answer of each incomplete pair, or 0.5."""
        forced_prompts = [f"{prompt}\n{official_cut(text)}\n</think>" for prompt, text in zip(prompts, texts,
                                                                                             strict=True)]
        params = self.vllm.SamplingParams(temperature=0, max_tokens=1, logprobs=20,
                                          allowed_token_ids=[self.true_token, self.false_token],
                                          skip_special_tokens=False)
        scores = []
        for output in self._generate(forced_prompts, params):
            try:
                final_logits = output.logprobs[-1]
                assert self.false_token in final_logits and self.true_token in final_logits
            except (IndexError, AssertionError):
                scores.append(0.5)
                continue
            scores.append(self._score(final_logits))
        return scores

    def judge(self, pairs: Sequence[tuple[str, str | Mapping[str, str]]], max_output_tokens: int) -> list[Judgment]:
        """The official outcome of every pair (``max_output_tokens``: the official reasoning budget; the official
        code fixes it per instance, which changes nothing in the engine)."""
        prompts = [official_prompt(query, passage) for query, passage in pairs]
        params = self.vllm.SamplingParams(temperature=0, max_tokens=max_output_tokens, logprobs=20,
                                          stop=["</think> true", "</think> false"], skip_special_tokens=False)
        outputs = self._generate(prompts, params)
        scores: list[float | None] = [None] * len(prompts)
        incomplete = []
        for i, output in enumerate(outputs):
            try:
                final_logits = output.logprobs[-1]
            except IndexError:
                incomplete.append(i)
                continue
            if self.true_token not in final_logits or self.false_token not in final_logits:
                incomplete.append(i)
                continue
            scores[i] = self._score(final_logits)
        if incomplete:
            fixed = self._fix_incomplete([prompts[i] for i in incomplete], [outputs[i].text for i in incomplete])
            for i, score in zip(incomplete, fixed, strict=True):
                scores[i] = score
        ignored = [not output.token_ids for output in outputs]
        return [Judgment(score=float(score), reasoning=output.text.split("</think>")[0],
                         n_tokens=len(output.token_ids), forced=i in incomplete and not ignored[i],
                         too_long=ignored[i])
                for i, (score, output) in enumerate(zip(scores, outputs, strict=True))]

    def close(self) -> None:
        """Free the engine (vLLM's in-process engine core holds the weights and the KV cache)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
