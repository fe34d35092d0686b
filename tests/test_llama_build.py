"""This llama-cpp-python build's CPU kernels for the weights' own buffers (AMX on CPUs that have it, repacked layouts)
compute what llama.cpp's plain CPU kernels compute, on a batch of many tokens, without crashing.

Why: on a CPU with AMX (Xeon 4th generation and later) a native build compiles llama.cpp's AMX kernels, which set
their tile configuration with ``_tile_loadconfig``. In GCC releases whose ``amxtileintrin.h`` defines it as an asm
that reads only 8 bytes (Debian 12's GCC 12.2), the compiler drops the stores past the first 8 bytes of the
64-byte configuration, and the first batch on a Q8_0/Q4_K… model dies of SIGSEGV in ``ldtilecfg`` (or computes
with whatever the stack held). Such a build must be made without AMX (README, "Set-up"; ``.ci/run``).

The check runs in a child process (a crash must fail this test, not end the session) and first in a session
(conftest.py): if it crashes, the session stops with the reason, since every later test that decodes would crash.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CHILD = Path(__file__).with_name("cpu_kernels_child.py")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
REBUILD = (f'CFLAGS="{NO_AMX}" CXXFLAGS="{NO_AMX}" pip install --force-reinstall --no-cache-dir --no-deps '
           "'llama-cpp-python>=0.3.36,<0.4'")


@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0", "Q4_K_M"])
def test_weight_buffer_kernels_agree_with_the_plain_ones(gguf_type, exported, tmp_path):
    run = subprocess.run([sys.executable, str(CHILD), str(exported("behaving", gguf_type)), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    if run.returncode < 0:
        pytest.exit(f"this llama-cpp-python build crashed ({signal.Signals(-run.returncode).name}) decoding a batch "
                    f"on a {gguf_type} model with llama.cpp's default CPU weight buffers (every later test that "
                    f"decodes would crash too). On a CPU with AMX this is a build by a GCC that drops llama.cpp's "
                    f"AMX tile configuration; rebuild it without AMX: {REBUILD}\n{run.stderr[-2000:]}", returncode=1)
    assert run.returncode == 0, run.stderr[-2000:]
    plain, extra = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "extra.npy")
    buffers = json.loads((tmp_path / "buffers.json").read_text())
    assert not set(buffers["plain"]) - {"CPU", "CPU_Mapped"}, buffers  # the reference used no extra buffer
    assert np.ptp(plain) > 4.0  # logits that vary enough for the bound to mean something
    assert int(np.argmax(extra)) == int(np.argmax(plain)), buffers
    # measured with AMX (tile configuration intact): 5.6e-4 of the range for F16 (its AVX-512 kernels take F32
    # activations), 5e-8 for Q8_0 and Q4_K_M
    assert np.abs(extra - plain).max() <= 0.005 * np.ptp(plain), buffers
