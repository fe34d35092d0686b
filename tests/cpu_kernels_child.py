"""Run in a child process by tests/test_llama_build.py: the last position's logits of a GGUF on one prompt batch,
computed twice, with llama.cpp's extra CPU weight buffers (AMX, repacked layouts; llama.cpp's default, which the
runtime uses) and without them (the plain CPU kernels). A child process, because a miscompiled kernel kills the
process that runs it.

Usage: ``python tests/cpu_kernels_child.py MODEL.gguf OUT_DIR``; writes ``extra.npy``, ``plain.npy`` and
``buffers.json`` (the weight buffers llama.cpp reported for each run, e.g. ``AMX``, ``CPU_REPACK``, ``CPU_Mapped``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np

from rank1_local.backends.llama.engine import llama_cpp_module, set_fields, tokenize_text
from rank1_local.core.prompt import build_prompt

# long enough for a batch of many rows (llama.cpp's AMX kernels take another path for a single row)
PROMPT = build_prompt("what is the boiling point of water at altitude?",
                      "At higher altitudes the air pressure is lower, so water boils below 100 °C — about 95 °C in "
                      "Denver, and about 70 °C on the summit of Everest, which is why food cooks slowly there.")


class _BufferNames(logging.Handler):
    """Collects the weight buffers from llama.cpp's load report ("load_tensors:  AMX model buffer size = ...")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"(\S+) model buffer size", record.getMessage())
        if found:
            self.names.append(found.group(1))


def last_logits(path: Path, extra_buffers: bool) -> tuple[np.ndarray, list[str]]:
    lc = llama_cpp_module()
    report = _BufferNames()
    log = logging.getLogger("llama.cpp")
    log.addHandler(report)
    log.setLevel(logging.DEBUG)
    mparams = lc.llama_model_default_params()
    set_fields(mparams, use_extra_bufts=extra_buffers)
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    log.removeHandler(report)
    cparams = lc.llama_context_default_params()
    set_fields(cparams, n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2, n_threads_batch=2, no_perf=True)
    ctx = lc.llama_init_from_model(model, cparams)
    try:
        vocab = lc.llama_model_get_vocab(model)
        ids = tokenize_text(lc, vocab, PROMPT)
        tokens = (lc.llama_token * len(ids))(*ids)
        status = lc.llama_decode(ctx, lc.llama_batch_get_one(tokens, len(ids)))  # logits of the last token only
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        logits = lc.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(lc.llama_vocab_n_tokens(vocab),)).copy(), report.names
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def main() -> None:
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    plain, plain_buffers = last_logits(model, extra_buffers=False)
    extra, extra_buffers = last_logits(model, extra_buffers=True)
    np.save(out / "plain.npy", plain)
    np.save(out / "extra.npy", extra)
    (out / "buffers.json").write_text(json.dumps({"plain": plain_buffers, "extra": extra_buffers}))


if __name__ == "__main__":
    main()
