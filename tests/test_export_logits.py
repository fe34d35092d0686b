"""GGUF F32 exports compute the same next-token logits in llama.cpp as the source in transformers fp32."""

from __future__ import annotations

import numpy as np
import pytest

from quantize.gguf_logits import LlamaCppLogits
from rank1_local.core.prompt import build_prompt

pytest.importorskip("transformers")
from quantize.hf_reference import TransformersLogits  # noqa: E402

PROMPTS = [
    build_prompt("what is the boiling point of water at altitude?",
                 "At higher altitudes the air pressure is lower, so water boils below 100 °C — "
                 "about 95 °C in Denver.\nSee also: pressure cookers."),
    build_prompt("東京の人口は？ 😀",
                 "Tokyo (東京) has ~14 million residents; the metro area 37M.\n\n    def f(x):\n\treturn x**2"),
    build_prompt("rank1", "")
    + "\nThe passage is empty, so it cannot answer the query.\n</think> false",
]


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen2-untied-sharded", "llama3", "mistral", "behaving"])
def test_f32_logits_match_transformers(name, fixture_dir, exported):
    source = TransformersLogits(fixture_dir(name))
    gguf = LlamaCppLogits(exported(name, "F32"), n_ctx=512, threads=2)
    try:
        for text in PROMPTS:
            ids = source.tokenize(text)
            assert gguf.tokenize(text) == ids
            ref, got = source.logits(ids), gguf.logits(ids)
            assert ref.shape == got.shape
            # logits must vary a lot for the 1e-3 bound to mean anything
            assert np.ptp(ref, axis=-1).min() > 4.0
            assert np.abs(ref - got).max() <= 1e-3, name
    finally:
        gguf.close()
