"""The GPU check's random-weight GGUFs (written straight from a shape, Q4_K_M by llama.cpp's quantizer) load and
score in the runtime, and its step timer splits every scheduler step into llama.cpp's time and ours."""

from __future__ import annotations

import shutil

from benchmarks.gpu.random_gguf import SHAPES, random_gguf, tensor_shapes
from benchmarks.gpu.steps import speed_pairs
from benchmarks.gpu.timing import instrument
from rank1_local import Rank1
from rank1_local.backends.llama import facade
from rank1_local.backends.llama.engine import LlamaEngine


def test_random_ggufs_score_and_every_step_is_timed(fixture_dir, tmp_path):
    tokenizer = tmp_path / "qwen2-tokenizer"  # the fixture's Qwen2.5 tokenizer: the same files, already built
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fixture_dir("qwen2-tied") / name, tokenizer / name)
    f16, _ = random_gguf("tiny", "F16", tmp_path)
    q4, _ = random_gguf("tiny", "Q4_K_M", tmp_path, threads=2)
    weights = sum(2 * rows * cols for rows, cols in (s for s in tensor_shapes(SHAPES["tiny"]).values() if len(s) == 2))
    assert weights < f16.stat().st_size < weights + 20_000_000  # F16 weights and the tokenizer's metadata
    assert q4.stat().st_size < 0.6 * f16.stat().st_size

    pairs = speed_pairs(3)
    with instrument() as times:
        assert facade.LlamaEngine is not LlamaEngine
        with Rank1(q4, parallel=2, max_think_tokens=4, n_ctx=512, threads=2) as model:
            results = model.score_pairs(pairs)
    assert facade.LlamaEngine is LlamaEngine  # restored
    assert [r.n_tokens for r in results] == [4, 4, 4] and all(r.forced for r in results)  # random: never closes
    every, steady = times.summary()["all"], times.summary()["generate"]
    assert every["steps"] >= 4 and every["device_ms"] > 0 and 0 < every["host_share"] < 1
    assert steady["steps"] >= 1 and steady["rows_per_step"] == steady["tokens_per_step"] >= 1
    assert abs(every["host_ms"] - (every["readout_ms"] + every["scheduler_ms"])) < 1e-9
