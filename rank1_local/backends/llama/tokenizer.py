"""The model's tokenizer for callers' threads: llama.cpp's vocabulary, loaded on its own (no weights, no context).

Preparing pairs (tokenizing prompts) happens in the callers' threads, while the context's owner thread decodes: the
two never share llama.cpp memory. The tokenizer has a lock of its own, and :meth:`LlamaTokenizer.close` frees its
vocabulary under that lock, so a call after close is a clear :class:`Rank1Error`, never a read of freed memory.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rank1_local.backends.llama.engine import llama_cpp_module, set_fields, token_piece, tokenize_text
from rank1_local.core.errors import CorruptFileError, Rank1Error


class LlamaTokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        lc = self._lc = llama_cpp_module()
        params = lc.llama_model_default_params()
        set_fields(params, vocab_only=True, n_gpu_layers=0)
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise CorruptFileError(f"{self.path}: llama.cpp could not read this GGUF's vocabulary "
                                   "(unsupported architecture or damaged file)")
        self._vocab = lc.llama_model_get_vocab(self._model)

    def _check(self) -> None:
        if not self._model:
            raise Rank1Error(f"{self.path.name}: the model was closed; load it again to keep using it")

    def tokenize(self, text: str) -> list[int]:
        """Ids as the HF tokenizer (and so vLLM) makes them: BOS where the model adds one, special tokens parsed."""
        with self._lock:
            self._check()
            return tokenize_text(self._lc, self._vocab, text)

    def detokenize(self, ids: list[int]) -> str:
        with self._lock:
            self._check()
            return b"".join(token_piece(self._lc, self._vocab, t) for t in ids).decode("utf-8", "ignore")

    def close(self) -> None:
        with self._lock:
            if self._model:
                self._lc.llama_model_free(self._model)
                self._model = None
