"""``GET /metrics``: the service's counters and gauges in Prometheus' text format (version 0.0.4).

Counters are totals since start (Prometheus' ``rate()`` turns them into per-second values); the ``*_per_second``
gauges are the rates over the last minute, for a glance without Prometheus.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rank1_local.core.engine import EngineStats, Histogram

WINDOW_S = 60.0


@dataclass
class RateWindow:
    """(time, pairs, tokens) samples of the last minute, taken at each scrape and each finished request."""

    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, pairs: int, tokens: int) -> tuple[float, float]:
        now = time.monotonic()
        self.samples.append((now, pairs, tokens))
        while len(self.samples) > 2 and now - self.samples[0][0] > WINDOW_S:
            self.samples.popleft()
        t0, p0, k0 = self.samples[0]
        span = now - t0
        return ((pairs - p0) / span, (tokens - k0) / span) if span > 0 else (0.0, 0.0)


def label_value(value: str) -> str:
    """A label value as Prometheus' text format requires it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: EngineStats, window: RateWindow, http_counts: dict[tuple[str, int], int]) -> str:
    """The engine's stats, the rates and the HTTP responses, in Prometheus' text format."""
    c = stats.counters
    pairs_per_s, tokens_per_s = window.add(int(c["pairs"]), stats.generated_tokens)
    lines: list[str] = []

    def header(name: str, kind: str, help_text: str) -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
        header(name, kind, help_text)
        lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    def histogram(name: str, help_text: str, h: Histogram | None) -> None:
        if h is None:
            return
        header(name, "histogram", help_text)
        for bound, count in zip(h.bounds, h.counts, strict=True):
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
        lines.append(f"{name}_sum {h.total:g}")
        lines.append(f"{name}_count {h.count}")

    info = f'{{backend="{label_value(stats.backend)}",device="{label_value(stats.device)}"}}'
    metric("rank1_engine_info", "gauge", "The backend that runs the model, and where.", 1, info)
    metric("rank1_pairs_total", "counter", "Pairs scored (cache hits included).", int(c["pairs"]))
    metric("rank1_cache_hits_total", "counter", "Pairs answered from the judgment cache.", int(c["cache_hits"]))
    metric("rank1_prompt_tokens_total", "counter", "Prompt tokens evaluated (shared prefixes once).",
           stats.prompt_tokens)
    metric("rank1_generated_tokens_total", "counter", "Tokens generated (reasoning and answers).",
           stats.generated_tokens)
    metric("rank1_cancelled_pairs_total", "counter", "Pairs dropped because their client went away.",
           int(c["cancelled_pairs"]))
    metric("rank1_requests_total", "counter", "Rerank requests accepted by the batch.", int(c["requests"]))
    metric("rank1_engine_errors_total", "counter", "Decoding failures (their requests got an error).",
           int(c["errors"]))
    for (route, status), n in sorted(http_counts.items()):
        metric("rank1_http_responses_total", "counter", "HTTP responses by route and status (routes the server does "
               "not have: other).", n, f'{{route="{label_value(route)}",status="{status}"}}')
    histogram("rank1_queue_seconds", "Seconds a pair waited between its request's admission and its start.",
              stats.queue_seconds)
    histogram("rank1_decode_seconds", "Seconds from a pair's start to its score (pairs decoded, not cache hits).",
              stats.decode_seconds)
    metric("rank1_pairs_per_second", "gauge", f"Pairs scored per second over the last {WINDOW_S:g} s.",
           float(pairs_per_s))
    metric("rank1_tokens_per_second", "gauge", f"Tokens generated per second over the last {WINDOW_S:g} s.",
           float(tokens_per_s))
    metric("rank1_queue_depth", "gauge", "Pairs admitted and waiting for a slot.", stats.waiting)
    metric("rank1_active_slots", "gauge", "Slots scoring a pair now.", stats.active_slots)
    metric("rank1_slots", "gauge", "Slots (pairs decoded together).", stats.slots)
    metric("rank1_open_requests", "gauge", "Requests with pairs still to score.", stats.open_requests)
    metric("rank1_uptime_seconds", "gauge", "Seconds since the server started.", float(time.time() - c["started"]))
    return "\n".join(lines) + "\n"
