"""The scoring engine interface: what every backend provides and every caller uses.

A :class:`ScoringEngine` takes a call's pairs and its protocol settings and gives back a :class:`TicketView`, through
which the caller receives the call's results as they finish (in its own thread with ``results()``, or in an event
loop with ``aresults()``) or cancels what is left. The library API, the HTTP server, its metrics, the run-file writer
and Ray Serve use only this interface, so any backend (llama.cpp, transformers, vLLM) can be served; the one
implementation is :class:`rank1_local.pipeline.Pipeline`, in front of each backend's executor.

Words, used the same way everywhere: the *backend* is the library that runs the model (llama.cpp, transformers,
vLLM); the *device* is where and how it runs ("CPU", "GPU offload (24/24 layers)", "transformers cuda float16"); the
*engine* is the object that decodes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import Pair
from rank1_local.core.results import Rank1Result, RunStats


class Lifecycle(Enum):
    """Where a model (and its engine) is in its life: taking work, finishing what it has, or gone."""

    OPEN = "open"  # takes new calls
    DRAINING = "draining"  # takes none; calls in flight go on until they finish or are cancelled
    CLOSED = "closed"  # every call has ended and the backend's resources are freed


@dataclass(frozen=True)
class Histogram:
    """Observations in cumulative buckets, as Prometheus' histograms count them: ``counts[i]`` observations were at
    most ``bounds[i]`` seconds; ``count`` and ``total`` are over all of them (the last bucket is +Inf)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine: its backend and device, its slots and queue, its totals since start."""

    backend: str
    device: str
    slots: int  # pairs it decodes together
    active_slots: int  # slots scoring a pair now
    waiting: int  # pairs admitted and not started
    open_requests: int  # calls with pairs still to score
    prompt_tokens: int  # evaluated (shared prefixes once)
    generated_tokens: int
    counters: dict[str, float] = field(default_factory=dict)  # requests, pairs, cache hits, cancellations, errors …
    queue_seconds: Histogram | None = None  # per pair: from its call's admission to its start
    decode_seconds: Histogram | None = None  # per pair decoded: from its start to its score


@dataclass(frozen=True)
class ShutdownReport:
    """What happened to the calls in flight when an engine began to stop."""

    in_flight: int
    finished_requests: int
    cancelled_requests: int
    cancelled_pairs: int


class TicketView(Protocol):
    """One call on its way through an engine."""

    id: int
    size: int  # results the call will get (one per input pair)

    def results(self) -> Iterator[Rank1Result]:
        """Each result as it finishes (``result.index`` is its position in the call's input); the call's failure is
        raised. Leaving the loop early cancels what is left."""
        ...

    def aresults(self, wait: float | None = None) -> AsyncIterator[Rank1Result | None]:
        """:meth:`results` for an event loop; ``None`` after each ``wait`` seconds without a result (for heartbeats
        and disconnect checks). Leaving the loop early cancels what is left."""
        ...

    def cancel(self) -> int:
        """Drop what is left of the call at once (waiting pairs; running ones stop at the next step); how many."""
        ...

    def stats(self) -> RunStats: ...


class ScoringEngine(Protocol):
    """The one interface every backend serves through."""

    def submit(self, pairs: Sequence[Pair | Sequence[Any]], config: ScoringConfig | None = None) -> TicketView:
        """Admit a call (at once, or :class:`~rank1_local.pipeline.Overloaded` / ``TooLarge``), prepare its pairs and
        queue them; results arrive through the ticket."""
        ...

    def stats(self) -> EngineStats: ...

    def drain(self) -> None:
        """Take no new calls; those in flight go on."""
        ...

    def stop(self, timeout: float, reason: str) -> ShutdownReport:
        """Take no new calls, give those in flight ``timeout`` seconds, then cancel the rest (each is told
        ``reason``)."""
        ...
