"""Where a decode step's time goes in the llama.cpp runtime: in llama.cpp (the device) or in our Python.

Inside :func:`instrument`, every ``Rank1`` built in this process times each scheduler step
(:meth:`Scheduler._decode_step`) and splits it into:

- ``decode``: the ``llama_decode`` call (with CUDA it queues the graph and returns; on the CPU it computes);
- ``wait``: a ``llama_synchronize`` right after it, i.e. waiting for the device to finish the step, the copy of the
  logits rows to host memory included (llama.cpp would wait at the first ``llama_get_logits_ith`` anyway);
- ``readout``: the rest of :meth:`LlamaEngine.decode`: filling the batch through ctypes before the call (with device
  sampling, attaching or detaching the slots' sampler chains too), and after it reading each row out: with host
  sampling a view of its logits (n_vocab float32, nothing copied); with device sampling its 20 candidates and their
  logits;
- ``scheduler``: the rest of the step: building the batch entries, and per row the pair decoder's work
  (:class:`~rank1_local.core.decoder.PairDecoder`): the greedy choice (on a host row, the argmax over the vocabulary),
  the token's text, the protocol's decision, the top-20 at the answer, refilling slots.

``decode + wait`` is the device's share; ``readout + scheduler`` is the host overhead this module measures. Steps where
every entry asks for logits (every slot reasoning, no prompt chunk) are also counted apart: those are the steady state
of a long generation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Bucket:
    steps: int = 0
    rows: int = 0  # entries that asked for logits
    tokens: int = 0  # entries in the batch
    step_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0
    engine_s: float = 0.0

    def add(self, other: Bucket) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def summary(self) -> dict[str, float]:
        """Per-step averages in milliseconds (and per logits row for the host parts)."""
        if not self.steps:
            return {"steps": 0}
        ms = 1000.0 / self.steps
        device = self.decode_s + self.wait_s
        host = self.step_s - device
        readout = self.engine_s - device
        return {"steps": self.steps, "rows_per_step": self.rows / self.steps, "tokens_per_step": self.tokens / self.steps,
                "step_ms": self.step_s * ms, "decode_ms": self.decode_s * ms, "wait_ms": self.wait_s * ms,
                "device_ms": device * ms, "host_ms": host * ms, "readout_ms": readout * ms,
                "scheduler_ms": (host - readout) * ms, "host_share": host / self.step_s if self.step_s else 0.0,
                "host_us_per_row": host / self.rows * 1e6 if self.rows else 0.0}


@dataclass
class StepTimes:
    all: Bucket
    generate: Bucket  # steps whose every entry asked for logits
    sampling: str | None = None  # where the last timed engine read its rows ("host" or "device")

    def summary(self) -> dict[str, Any]:
        return {"all": self.all.summary(), "generate": self.generate.summary()}


class _Current:
    """The step being timed (one owner thread drives a scheduler, so one at a time per process)."""

    def __init__(self) -> None:
        self.step = Bucket()


class _TimedLlama:
    """llama_cpp with ``llama_decode`` timed and followed by a timed ``llama_synchronize``."""

    def __init__(self, lc: Any, current: _Current) -> None:
        self._lc, self._current = lc, current

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lc, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        t0 = time.perf_counter()
        status = self._lc.llama_decode(ctx, batch)
        t1 = time.perf_counter()
        self._lc.llama_synchronize(ctx)
        t2 = time.perf_counter()
        self._current.step.decode_s += t1 - t0
        self._current.step.wait_s += t2 - t1
        return status


@contextlib.contextmanager
def instrument() -> Iterator[StepTimes]:
    """Time every scheduler step of the ``Rank1`` models built inside the block (see the module docstring)."""
    from rank1_local.backends.llama import facade
    from rank1_local.backends.llama.engine import LlamaEngine
    from rank1_local.backends.llama.scheduler import Scheduler

    times = StepTimes(Bucket(), Bucket())
    current = _Current()

    class TimedEngine(LlamaEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.lc = _TimedLlama(self.lc, current)

        def decode(self, entries: list) -> dict:
            t0 = time.perf_counter()
            try:
                return super().decode(entries)
            finally:
                times.sampling = self.sampling
                step = current.step
                step.engine_s += time.perf_counter() - t0
                step.tokens += len(entries)
                step.rows += sum(1 for e in entries if e.logits)

    original_step = Scheduler._decode_step

    def timed_step(self: Scheduler, *args: Any, **kwargs: Any) -> None:
        current.step = Bucket()
        t0 = time.perf_counter()
        try:
            original_step(self, *args, **kwargs)
        finally:
            step = current.step
            step.step_s = time.perf_counter() - t0
            step.steps = 1
            times.all.add(step)
            if step.rows and step.rows == step.tokens:
                times.generate.add(step)

    original_engine = facade.LlamaEngine
    facade.LlamaEngine = TimedEngine
    Scheduler._decode_step = timed_step
    try:
        yield times
    finally:
        facade.LlamaEngine = original_engine
        Scheduler._decode_step = original_step


def reset(times: StepTimes) -> None:
    """Forget what was timed so far (e.g. a warm-up call)."""
    times.all, times.generate, times.sampling = Bucket(), Bucket(), None
