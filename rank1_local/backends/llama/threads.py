"""How llama.cpp's CPU threads wait (set before its OpenMP runtime loads), and how many there are (changed between
decode steps to the cores the rest of the machine leaves free).

llama.cpp's CPU backend runs every operation of a decode step on an OpenMP team, and between operations the threads
wait at a barrier. By default GNU OpenMP spins there for a while before sleeping: on an idle machine that saves a
wake-up, but when anything else runs (a browser, a second job, Ray workers) the spinning threads take the cores the
working ones need, and a team with more threads than free cores stalls at every barrier. The defaults here: spin
briefly, then sleep (a user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is left as it is), and, where the user
gave no thread count, run as many threads as the other processes leave cores free (:class:`CoreShare`). On the
2-core machine of ``benchmarks/results/busy.md`` that keeps 1.00x of the best setting's throughput idle, 0.89x beside
one busy process and 0.79x beside two (every core with GNU's default waiting: 0.99x, 0.42x, 0.54x).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# GNU OpenMP's spin count before a waiting thread sleeps (its default: 300,000; with OMP_WAIT_POLICY=PASSIVE, 0)
SPIN_COUNT = "10000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_openmp_waiting() -> None:
    """Set the waiting default in the environment, unless the user set either variable; call it before
    llama.cpp's libraries are first loaded (the OpenMP runtime reads them once, when it loads)."""
    if not any(name in os.environ for name in WAIT_VARIABLES):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has run since boot (``/proc/stat``'s first line, idle and I/O wait
    left out); None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 8 or fields[0] != b"cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(f) for f in fields[1:])
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CoreShare:
    """How many threads llama.cpp should run now: every core the other processes on the machine leave free, between
    1 and ``most``.

    Measured, at most once per ``interval`` seconds, as the machine's busy CPU time less this process's own (its
    spinning OpenMP threads count as its own), per second of wall time. With every core free the answer is ``most``;
    with one core's worth of work elsewhere, one fewer. A team with more threads than free cores is what collapses
    throughput: its threads wait for each other at every barrier while another process holds a core
    (``benchmarks/results/busy.md``). Where the machine's load cannot be read (no ``/proc/stat``), or this process
    may run on fewer cores than the machine has, the answer is always ``most``."""

    def __init__(self, most: int, *, interval: float = 1.0, cores: int | None = None,
                 machine_busy: Callable[[], float | None] = busy_cpu_seconds,
                 own_busy: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic) -> None:
        self.most = most
        self.interval = interval
        self.cores = cores if cores is not None else (os.cpu_count() or 1)
        self._machine_busy, self._own_busy, self._clock = machine_busy, own_busy, clock
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else self.cores
        first = machine_busy()
        self.enabled = most > 1 and first is not None and (cores is not None or affinity == self.cores)
        self.current = most
        self._last = (clock(), first or 0.0, own_busy())

    def threads(self) -> int:
        """The thread count for the next step (the last answer until ``interval`` has passed)."""
        if not self.enabled:
            return self.most
        now = self._clock()
        then, machine_then, own_then = self._last
        if now - then < self.interval:
            return self.current
        machine, own = self._machine_busy(), self._own_busy()
        if machine is None:
            return self.current
        self._last = (now, machine, own)
        others = max(0.0, (machine - machine_then) - (own - own_then)) / (now - then)
        self.current = max(1, min(self.most, self.cores - round(others)))
        return self.current
