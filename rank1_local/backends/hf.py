"""rank1 on a Hugging Face checkpoint with transformers (``rank1-local rerank --backend transformers``, and the
reference engine of ``rank1-bench reference`` where vLLM is absent).

The same protocol as the llama.cpp runtime — the same prepared prompts, greedy decoding, the same
:class:`~rank1_local.core.decoder.PairDecoder` deciding after each row — one pair at a time with a KV cache. It
runs unquantized checkpoints (fp32 on CPU, fp16 on CUDA) and the AWQ/GPTQ checkpoints transformers can load.

Needs the ``reference`` extra (torch, transformers; ``gptq`` for AWQ/GPTQ); importing this module imports neither.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.cards import ModelCard, card_named, recognise_card
from rank1_local.core.config import ScoringConfig, split_settings
from rank1_local.core.decoder import Become, Feed, PairDecoder, decode_pair
from rank1_local.core.errors import Rank1Error, UnsupportedModelError
from rank1_local.core.extras import require
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.protocol import answer_token_ids, common_prefix_len
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import Rank1Result, too_long_result
from rank1_local.models.hub import resolve_local_or_hub
from rank1_local.pipeline import Pipeline
from rank1_local.pipeline.admission import check_max_waiting
from rank1_local.pipeline.serial import SerialOwner

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class HFSettings:
    """Engine settings of the transformers backend.

    Args:
        device: "cpu", "cuda", "cuda:1" … or "auto" (CUDA when available).
        dtype: "auto" (float16 on CUDA, float32 on CPU; float16 for AWQ/GPTQ checkpoints everywhere), "float32",
            "float16" or "bfloat16".
        max_waiting: pairs that may wait to be scored at once (None: no limit); more is refused at once.
    """

    device: str = "auto"
    dtype: str = "auto"
    max_waiting: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise Rank1Error(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        check_max_waiting(self.max_waiting)


def prepare_gptqmodel_env() -> None:
    """GPTQModel sizes its CPU worker pool as half the cores but asks for 2 model-loading workers, which fails
    on 1–3 core machines ("Virtual pool 'model_loader:cpu' requests 2 workers"); its own environment knob sets
    the pool size. Call before gptqmodel is first imported (transformers imports it to load AWQ/GPTQ)."""
    if (os.cpu_count() or 1) < 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def checkpoint_card(path: Path, card: str | ModelCard | None) -> ModelCard:
    """The model card of a checkpoint folder: the one named, or the one its config.json and name show."""
    if isinstance(card, ModelCard):
        return card
    if card is not None:
        return card_named(card)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return recognise_card(hf_config=config if isinstance(config, dict) else {}, name=path.name)


def quantization_method(path: Path) -> str | None:
    """``quant_method`` of a checkpoint's ``quantization_config`` (gptq, awq …), or None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") if isinstance(quant, dict) else None


def byte_level_alphabet() -> dict[int, str]:
    """Byte-level BPE's map from each byte to the printable character that stands for it in token strings (the
    GPT-2 scheme used by the Qwen2, Llama-3 and Tekken tokenizers)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


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


class TorchRow:
    """A row of logits as a torch tensor (float32): only what the decoder asks is computed or copied."""

    def __init__(self, logits: Any) -> None:
        self.values = logits

    def best(self) -> int:
        return int(self.values.argmax())  # torch's argmax: the first maximum, the lowest id among equals

    def top(self, k: int) -> dict[int, float]:
        values, ids = self.values.topk(k)
        return {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist())}

    def logits(self, ids: Sequence[int]) -> list[float]:
        return [float(self.values[i]) for i in ids]


class _TransformersScorer:
    """The loaded torch model and the protocol's steps over it, one pair at a time (owned by the backend's owner
    thread, which loads it)."""

    batch_size = 1

    def __init__(self, path: Path, torch: Any, transformers: Any, tokenizer: Any, device: str, dtype: str,
                 quant: str | None, answer_ids: tuple[int, int], card: ModelCard) -> None:
        self.torch, self.tokenizer, self.device, self.card = torch, tokenizer, device, card
        self.true_id, self.false_id = answer_ids
        if quant:
            prepare_gptqmodel_env()
        try:
            # GPTQModel (loaded by transformers for AWQ/GPTQ) prints a banner to stdout: keep stdout for results
            with contextlib.redirect_stdout(sys.stderr):
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=getattr(torch, dtype)).to(device).eval()
        except (ImportError, ValueError, RuntimeError) as exc:
            hint = (f" ({quant} checkpoints need GPTQModel: pip install 'rank1-local[gptq]')"
                    if quant in ("gptq", "awq") else f" ({quant} checkpoints need their own kernels)" if quant else "")
            raise UnsupportedModelError(f"{path}: transformers could not load this checkpoint on "
                                        f"{device}{hint}: {str(exc).splitlines()[0][:300]}") from None
        self.eos_ids = self._eos_ids()
        self._added = {int(i) for i in tokenizer.get_added_vocab().values()}
        self._byte_decoder = {c: b for b, c in byte_level_alphabet().items()}

    def _eos_ids(self) -> set[int]:
        """What ends generation, as vLLM decides it: the tokenizer's and the generation config's EOS."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
        return {i for i in ids if i is not None}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _piece(self, token: int) -> bytes:
        """The token's bytes (byte-level BPE), added tokens as their text."""
        text = self.tokenizer.convert_ids_to_tokens(token)
        if token in self._added:
            return text.encode()
        try:
            return bytes(self._byte_decoder[c] for c in text)
        except KeyError:
            return self.tokenizer.decode([token], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False).encode()

    def piece(self, token: int) -> bytes:
        return self._piece(token)

    def is_eog(self, token: int) -> bool:
        return token in self.eos_ids

    def score_one(self, pair: PreparedPair, config: ScoringConfig) -> Rank1Result:
        """One pair: the prompt is fed, then each row goes to the pair's decoder (the same one the llama.cpp
        scheduler drives), which says what to feed next."""
        if pair.too_long:
            return too_long_result(pair)
        decoder = PairDecoder(pair, config, config.n_ctx, self, (self.true_id, self.false_id),
                              reasons=self.card.reasons)
        seq = _Sequence(self.model, self.torch, self.device)

        def carry_out(action: Feed | Become) -> TorchRow:
            ids = seq.ids + [action.token] if isinstance(action, Feed) else action.ids
            return TorchRow(seq.feed(ids))

        return decode_pair(pair, decoder, TorchRow(seq.feed(pair.ids)), carry_out)

    def score(self, pairs: Sequence[PreparedPair], config: ScoringConfig,
              deliver: Callable[[int, Rank1Result], None], cancelled: Callable[[int], bool]) -> None:
        for i, pair in enumerate(pairs):
            if not cancelled(i):
                deliver(i, self.score_one(pair, config))

    def close(self) -> None:
        self.model = None


class TransformersRank1(Reranker):
    """rank1 on a Hugging Face checkpoint (local folder or hub id) with transformers.

    Args:
        model: checkpoint folder or hub id (unquantized, AWQ or GPTQ).
        config: the protocol settings (or their keyword arguments), as for :class:`rank1_local.Rank1`.
        settings: :class:`HFSettings` (or ``device=``, ``dtype=``, ``max_waiting=``).
    """

    backend = "transformers"

    def __init__(self, model: str | Path, config: ScoringConfig | None = None, settings: HFSettings | None = None,
                 *, card: str | ModelCard | None = None, **kwargs: Any) -> None:
        config, settings = split_settings("TransformersRank1", config, settings, HFSettings, kwargs)
        path = resolve_local_or_hub(model)  # before torch is imported: a missing model is an error in a second
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
        self.card = checkpoint_card(path, card)
        torch = require("torch", "reference", "the transformers backend")
        transformers = require("transformers", "reference", "the transformers backend")
        self.config, self.settings = config, settings
        self.model_path = path
        # where torch runs ("cpu", "cuda" …); ``device`` (the property) is the backend-and-device words
        self.torch_device = ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" \
            else settings.device
        quant = quantization_method(path)
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "float32" if self.torch_device == "cpu" and not quant else "float16"
        if quant in ("gptq", "awq") and dtype == "float32":
            # GPTQModel's CPU GPTQ kernel gives wrong logits with float32 activations (seen with 7.6.0).
            raise Rank1Error(f"{path.name} is a {quant} checkpoint: its kernels run in float16 or bfloat16, "
                             "not float32 (use dtype auto)")
        self.dtype = dtype
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        card = self.card
        try:
            self.true_id, self.false_id = answer_token_ids(self.tokenize, card.answers, card.name)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{path.name}: {exc}") from None
        answer_ids = (self.true_id, self.false_id)
        tokenizer, device = self.tokenizer, self.torch_device
        self._owner = SerialOwner(lambda: _TransformersScorer(path, torch, transformers, tokenizer, device, dtype,
                                                              quant, answer_ids, card), name="rank1-transformers")
        self.engine = Pipeline(self, self._owner, config, backend=self.backend, device=self.device,
                               max_waiting=settings.max_waiting, card=card)
        logger.info("loaded %s with transformers on %s (%s)", path.name, self.torch_device, dtype)

    @property
    def device(self) -> str:
        return f"transformers {self.torch_device} {self.dtype}"

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _close_backend(self) -> None:
        """The owner thread stops, then drops the torch model."""
        self._owner.close()
