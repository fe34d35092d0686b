"""An engine's totals since start (requests, pairs, cache hits, cancellations, errors) and its latency histograms, each
changed under a lock (several threads deliver and submit)."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field

from rank1_local.core.engine import Histogram

# seconds: from a few milliseconds (a cache hit, a prefill) to the minutes a long reasoning chain can take on a CPU
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)


class HistogramCounter:
    """Observations counted into :data:`BUCKETS`."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * len(bounds)
        self._count = 0
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float, n: int = 1) -> None:
        i = bisect_left(self.bounds, seconds)
        with self._lock:
            if i < len(self._counts):
                self._counts[i] += n
            self._count += n
            self._total += seconds * n

    def snapshot(self) -> Histogram:
        with self._lock:
            cumulative, running = [], 0
            for c in self._counts:
                running += c
                cumulative.append(running)
            return Histogram(self.bounds, tuple(cumulative), self._count, self._total)


@dataclass
class Counters:
    """Totals since start."""

    requests: int = 0  # calls admitted
    requests_done: int = 0  # calls with every result delivered
    pairs: int = 0  # results delivered, cache hits and copies included
    cache_hits: int = 0
    cancelled_requests: int = 0
    cancelled_pairs: int = 0
    errors: int = 0
    started: float = field(default_factory=time.time)
    queue_seconds: HistogramCounter = field(default_factory=HistogramCounter, repr=False, compare=False)
    decode_seconds: HistogramCounter = field(default_factory=HistogramCounter, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if isinstance(v, (int, float)) and not k.startswith("_")}
