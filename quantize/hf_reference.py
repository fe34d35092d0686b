"""The source checkpoint in transformers (fp32 on CPU, fp16 on CUDA) — the ``reference`` extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import install_hint


def require_reference_extra() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Rank1Error(f"this needs torch and transformers: {install_hint('reference', exc.name or 'torch')} "
                         "(or verify against another GGUF file with --source FILE.gguf)") from None


class TransformersLogits:
    """Logits of a Hugging Face checkpoint for every position of a token sequence."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu") -> None:
        require_reference_extra()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def close(self) -> None:
        del self.model
