"""rank1 scoring on a Hugging Face checkpoint with transformers (``rank1-local rerank --backend transformers``,
the reference engine of ``rank1-bench reference``). It lives beside the exporter, not in the torch-free runtime.

The same protocol as the llama.cpp runtime (same prompt, same fitting, greedy decoding, ``</think>``
found on decoded text, score from the full next-token logits, the same fallback and rethink rules), one
pair at a time with a KV cache. It runs unquantized checkpoints (fp32 on CPU, fp16 on CUDA: the
reference where vLLM is absent) and the AWQ/GPTQ checkpoints transformers can load.

Needs the ``reference`` extra (torch, transformers); importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rank1_local.api import Reranker
from rank1_local.errors import Rank1Error, UnsupportedModelError
from rank1_local.hub import resolve_local_or_hub
from rank1_local.pairs import Pair, fit_prompt, formatted, normalize_pairs
from rank1_local.protocol import RETHINK_SUFFIX, answer_token_ids, common_prefix_len, fallback_prompt, true_false_score
from rank1_local.results import Rank1Result, RunStats

logger = logging.getLogger(__name__)

THINK_CLOSE = "</think>"
_CLOSE_WINDOW = 16  # tokens decoded to look for a freshly completed "</think>"


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise Rank1Error("the transformers backend needs torch and transformers: "
                         "pip install 'rank1-local[reference]'") from None
    return torch, transformers


class _Sequence:
    """One growing token sequence and its KV cache."""

    def __init__(self, model: Any, torch: Any, device: str) -> None:
        from transformers import DynamicCache

        self.model, self.torch, self.device = model, torch, device
        self.cache = DynamicCache()
        self.ids: list[int] = []

    def feed(self, ids: list[int]) -> Any:
        """Make the sequence equal ``ids`` (reusing the cached common prefix); next-token logits (fp32)."""
        keep = min(common_prefix_len(self.ids, ids), len(ids) - 1)
        if keep < len(self.ids):
            self.cache.crop(keep - len(self.ids))  # negative: drop that many (transformers 4.x and 5.x)
        new = ids[keep:]
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([new], device=self.device), past_key_values=self.cache,
                             use_cache=True)
        self.cache = out.past_key_values
        self.ids = list(ids)
        return out.logits[0, -1].float()


class TransformersRank1(Reranker):
    """rank1 on a Hugging Face checkpoint (local folder or hub id) with transformers.

    Args:
        model: checkpoint folder or hub id (unquantized, AWQ or GPTQ).
        device: "cpu", "cuda", "cuda:1" … or "auto" (CUDA when available).
        dtype: "auto" (float16 on CUDA, float32 on CPU; float16 for AWQ/GPTQ checkpoints everywhere), "float32",
            "float16" or "bfloat16".
        max_think_tokens, n_ctx, rethink_rounds, prompt_template: as for :class:`rank1_local.Rank1`.
    """

    def __init__(self, model: str | Path, *, device: str = "auto", dtype: str = "auto",
                 max_think_tokens: int = 1024, n_ctx: int = 4096, rethink_rounds: int = 0,
                 prompt_template: str | None = None) -> None:
        torch, transformers = _import_torch_transformers()
        if not 1 <= max_think_tokens <= 8192 * 4:
            raise Rank1Error("max_think_tokens must be between 1 and 32768 (official budget: 8192)")
        if prompt_template is not None:
            formatted(Pair("q", "p"), 0, prompt_template)  # validates the placeholder
        self.torch = torch
        path = resolve_local_or_hub(model)
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
        self.model_path = path
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        quant = self._quantization_method(path)
        if dtype == "auto":
            dtype = "float32" if self.device == "cpu" and not quant else "float16"
        if dtype not in ("float32", "float16", "bfloat16"):
            raise Rank1Error(f"dtype must be auto, float32, float16 or bfloat16, not {dtype!r}")
        if quant in ("gptq", "awq") and dtype == "float32":
            # GPTQModel's CPU GPTQ kernel gives wrong logits with float32 activations (seen with 7.6.0).
            raise Rank1Error(f"{path.name} is a {quant} checkpoint: its kernels run in float16 or bfloat16, "
                             "not float32 (use dtype auto)")
        self.dtype = dtype
        if quant:
            from quantize.weight_quant import prepare_gptqmodel_env

            prepare_gptqmodel_env()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        try:
            # GPTQModel (loaded by transformers for AWQ/GPTQ) prints a banner to stdout: keep stdout for results
            with contextlib.redirect_stdout(sys.stderr):
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=getattr(torch, dtype)).to(self.device).eval()
        except (ImportError, ValueError, RuntimeError) as exc:
            hint = (f" ({quant} checkpoints need GPTQModel: pip install 'rank1-local[gptq]')"
                    if quant in ("gptq", "awq") else f" ({quant} checkpoints need their own kernels)" if quant else "")
            raise UnsupportedModelError(f"{path}: transformers could not load this checkpoint on "
                                        f"{self.device}{hint}: {str(exc).splitlines()[0][:300]}") from None
        self.max_think_tokens = max_think_tokens
        self.n_ctx = n_ctx
        self.rethink_rounds = rethink_rounds
        self.prompt_template = prompt_template
        self.true_id, self.false_id = answer_token_ids(self._tokenize)
        self.eos_ids = self._eos_ids()
        self.last_stats: RunStats | None = None
        logger.info("loaded %s with transformers on %s (%s)", path.name, self.device, dtype)

    @staticmethod
    def _quantization_method(path: Path) -> str | None:
        import json

        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        quant = config.get("quantization_config") or {}
        return quant.get("quant_method") if isinstance(quant, dict) else None

    @property
    def backend(self) -> str:
        return f"transformers {self.device} {self.dtype}"

    def _eos_ids(self) -> set[int]:
        """What ends generation, as vLLM decides it: the tokenizer's and the generation config's EOS."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return {i for i in ids if i is not None}

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _score_one(self, index: int, prompt: str, prompt_ids: list[int], dropped: int) -> Rank1Result:
        started = time.perf_counter()
        seq = _Sequence(self.model, self.torch, self.device)
        logits = seq.feed(prompt_ids)
        base, new_tokens = "", []  # reasoning text = base + decode(new_tokens); base changes on rethink
        generated = 0
        rethinks_left = self.rethink_rounds
        while True:
            token = int(logits.argmax())
            if token in self.eos_ids:
                break
            new_tokens.append(token)
            generated += 1
            if THINK_CLOSE in self._detokenize(new_tokens[-_CLOSE_WINDOW:]):
                text = base + self._detokenize(new_tokens)
                reasoning = text[:text.index(THINK_CLOSE)]
                if rethinks_left > 0:
                    rethinks_left -= 1
                    base, new_tokens = reasoning + RETHINK_SUFFIX, []
                    logits = seq.feed(self._tokenize(prompt + base))
                    continue
                logits = seq.feed(seq.ids + [token])
                return self._result(index, logits, reasoning, generated, False, prompt_ids, dropped, started)
            if generated >= self.max_think_tokens:
                break
            logits = seq.feed(seq.ids + [token])
        text = base + self._detokenize(new_tokens)
        logits = seq.feed(self._tokenize(fallback_prompt(prompt, text)))
        return self._result(index, logits, text, generated, True, prompt_ids, dropped, started)

    def _result(self, index: int, logits: Any, reasoning: str, n_tokens: int, forced: bool, prompt_ids: list[int],
                dropped: int, started: float) -> Rank1Result:
        score = true_false_score(float(logits[self.true_id]), float(logits[self.false_id]))
        return Rank1Result(index=index, score=score, reasoning=reasoning, n_tokens=n_tokens, forced=forced,
                           truncated=dropped > 0, passage_tokens_dropped=dropped, n_prompt_tokens=len(prompt_ids),
                           seconds=time.perf_counter() - started)

    def score_pairs(self, pairs: Sequence[Pair | tuple], *,
                    on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
        norm = normalize_pairs(pairs)
        fitted = []
        for i, pair in enumerate(norm):  # validate everything before the first slow step
            query, passage = formatted(pair, i, self.prompt_template)
            fitted.append(fit_prompt(query, passage, tokenize=self._tokenize, detokenize=self._detokenize,
                                     n_ctx=self.n_ctx, max_think_tokens=self.max_think_tokens))
        start = time.perf_counter()
        results = []
        for i, fit in enumerate(fitted):
            result = self._score_one(i, fit.prompt, fit.ids, fit.passage_tokens_dropped)
            results.append(result)
            if on_result:
                on_result(result)
        self.last_stats = RunStats(len(results), sum(r.n_prompt_tokens for r in results),
                                   sum(r.n_tokens for r in results), time.perf_counter() - start)
        return results

    def close(self) -> None:
        self.model = None
