"""llama.cpp's log, routed to Python logging (logger ``llama.cpp``) instead of printed to stderr.

llama.cpp reports in fragments (a line may arrive in pieces, continued with the CONT level); they are joined into
lines and logged at their level: its chatter (INFO, DEBUG) at DEBUG, warnings and errors as such, so ``-q`` and a
logging configuration decide what a user sees. Two warnings that are no problem are logged at DEBUG (see
``_EXPECTED``): the one our own KV layout provokes (with a unified KV cache, llama.cpp compares the cache's total
size, every slot's context together, with the model's training context, but no sequence ever exceeds ``n_ctx``), and
the one every Qwen2 vocabulary provokes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("llama.cpp")

# ggml_log_level (ggml.h of the llama.cpp that llama-cpp-python 0.3.36 vendors): NONE 0, DEBUG 1, INFO 2, WARN 3,
# ERROR 4, CONT 5 (continues the previous message). llama-cpp-python's own mapping predates this order.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONT = 5
# warnings that describe our own, intended set-up, or the model family's vocabulary, not a problem:
# - with the unified KV cache, llama.cpp compares every slot's context together with the training context;
# - Qwen2's byte-level vocabulary has "</s>" as an ordinary token (id 128247), which llama.cpp takes for an
#   end-of-generation marker and re-types, with this warning, in every Qwen2 GGUF (llama.cpp's own conversions too).
_EXPECTED = ("possible training context overflow", "'</s>' was not control-type")


class _LineJoiner:
    """Joins llama.cpp's log fragments into lines (one buffer per thread: contexts log from several)."""

    def __init__(self) -> None:
        self._state = threading.local()

    def feed(self, level: int, text: str) -> None:
        state = self._state
        if level != _CONT:
            state.level = _LEVELS.get(level, logging.DEBUG)
        buffer = getattr(state, "buffer", "") + text
        *lines, state.buffer = buffer.split("\n")
        for line in lines:
            if line.strip():
                emitted = logging.DEBUG if any(e in line for e in _EXPECTED) else getattr(state, "level", logging.DEBUG)
                logger.log(emitted, "%s", line.strip())


_joiner = _LineJoiner()
_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def route_llama_logs(llama_cpp: Any) -> None:
    """Install the routing callback (llama-cpp-python installs its own stderr printer at import)."""
    global _callback
    if _callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        try:
            _joiner.feed(int(level), text.decode("utf-8", "replace"))
        except Exception:  # never raise into C
            pass

    _callback = callback
    llama_cpp.llama_log_set(callback, None)
