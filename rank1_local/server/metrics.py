"""``GET /metrics``: the service's counters and gauges in Prometheus' text format (version 0.0.4).

Counters are totals since start (Prometheus' ``rate()`` turns them into per-second values); the ``*_per_second``
gauges are the rates over the last minute, for a glance without Prometheus.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rank1_local.backends.llama.facade import Rank1

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


def render(model: Rank1, window: RateWindow, http_counts: dict[tuple[str, int], int]) -> str:
    c = model.pipeline.counters.snapshot()
    prompt_tokens, generated_tokens = model.tokens
    pairs_per_s, tokens_per_s = window.add(int(c["pairs"]), generated_tokens)
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    metric("rank1_pairs_total", "counter", "Pairs scored (cache hits included).", c["pairs"])
    metric("rank1_cache_hits_total", "counter", "Pairs answered from the judgment cache.", c["cache_hits"])
    metric("rank1_prompt_tokens_total", "counter", "Prompt tokens evaluated (shared prefixes once).", prompt_tokens)
    metric("rank1_generated_tokens_total", "counter", "Tokens generated (reasoning and answers).", generated_tokens)
    metric("rank1_cancelled_pairs_total", "counter", "Pairs dropped because their client went away.",
           c["cancelled_pairs"])
    metric("rank1_requests_total", "counter", "Rerank requests accepted by the batch.", c["requests"])
    metric("rank1_engine_errors_total", "counter", "Decoding failures (their requests got an error).", c["errors"])
    for (route, status), n in sorted(http_counts.items()):
        metric("rank1_http_responses_total", "counter", "HTTP responses by route and status (routes the server does "
               "not have: other).", n, f'{{route="{label_value(route)}",status="{status}"}}')
    metric("rank1_pairs_per_second", "gauge", f"Pairs scored per second over the last {WINDOW_S:g} s.",
           float(pairs_per_s))
    metric("rank1_tokens_per_second", "gauge", f"Tokens generated per second over the last {WINDOW_S:g} s.",
           float(tokens_per_s))
    metric("rank1_queue_depth", "gauge", "Pairs waiting for a slot.", model.waiting)
    metric("rank1_active_slots", "gauge", "Slots scoring a pair now.", model.active_slots)
    metric("rank1_slots", "gauge", "Slots (pairs decoded together).", model.slots)
    metric("rank1_open_requests", "gauge", "Requests with pairs still to score.", model.pipeline.open_tickets)
    metric("rank1_uptime_seconds", "gauge", "Seconds since the server started.", float(time.time() - c["started"]))
    return "\n".join(lines) + "\n"
