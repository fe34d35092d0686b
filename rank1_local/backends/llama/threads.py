"""How llama.cpp's CPU threads wait (set before its OpenMP runtime loads), and how many there are (changed between
decode steps to the cores the rest of the machine leaves free).

llama.cpp's CPU backend runs every operation of a decode step on an OpenMP team, and between operations the threads
wait at a barrier. By default GNU OpenMP spins there for a while before sleeping: on an idle machine that saves a
wake-up, but when anything else runs (a browser, a second job, Ray workers) the spinning threads take the cores the
working ones need, and a team with more threads than free cores stalls at every barrier. The defaults here: spin
briefly, then sleep (a user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is left as it is), and, where the user
gave no thread count, run as many threads as the other processes leave cores free, and every thread when they leave
none (:class:`CoreShare`); the measured shares of the best setting are in ``benchmarks/results/busy.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# GNU OpenMP's spin count before a waiting thread sleeps (its default: 300,000; with OMP_WAIT_POLICY=PASSIVE, 0)
SPIN_COUNT = "1000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_openmp_waiting() -> None:
    """Set the waiting default in the environment, unless the user set either variable; call it before
    llama.cpp's libraries are first loaded (the OpenMP runtime reads them once, when it loads)."""
    if not any(name in os.environ for name in WAIT_VARIABLES):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def runnable_threads() -> int | None:
    """Threads on the machine that are running or waiting for a core now (``/proc/loadavg``'s fourth field, the
    kernel's ``nr_running``); None where there is no ``/proc/loadavg``."""
    try:
        with open("/proc/loadavg", "rb") as loadavg:
            return int(loadavg.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None


def own_runnable_threads() -> int:
    """This process's threads that are running or waiting for a core now (state R in ``/proc/self/task/*/stat``)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", "rb") as stat:
                line = stat.read()
        except OSError:  # the thread ended meanwhile
            continue
        end = line.rfind(b")")  # the command name, in brackets, may hold spaces and brackets itself
        count += line[end + 2:end + 3] == b"R"
    return max(1, count)  # the thread reading this runs


class CoreShare:
    """How many threads llama.cpp should run now, between 1 and ``most``.

    What the other processes want is sampled between decode steps, at most once per ``sample_every`` seconds: the
    machine's runnable threads (running, or waiting for a core) less this process's own. Once per ``interval``
    seconds, their mean over the samples decides:

    - while cores are left free, run on every one of them (at most ``most``): a team with more threads than free
      cores is what collapses throughput, its threads waiting for each other at every barrier while another process
      holds a core;
    - when the other processes want every core, run ``most``: nothing gets a core to itself, and the kernel shares
      the time slices per runnable thread, so one thread would get a third of two cores beside two busy processes,
      and two get half.

    Runnable threads, not CPU time: a starved process shows how much it wants, where its CPU time shows only what it
    got (``benchmarks/results/busy.md``). Where the machine's threads cannot be read (no ``/proc``), or this process
    may run on fewer cores than the machine has, the answer is always ``most``."""

    def __init__(self, most: int, *, interval: float = 1.0, sample_every: float = 0.05, cores: int | None = None,
                 runnable: Callable[[], int | None] = runnable_threads,
                 own_runnable: Callable[[], int] = own_runnable_threads,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.most = most
        self.interval, self.sample_every = interval, sample_every
        self.cores = cores if cores is not None else (os.cpu_count() or 1)
        self._runnable, self._own_runnable, self._clock = runnable, own_runnable, clock
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else self.cores
        self.enabled = most > 1 and runnable() is not None and (cores is not None or affinity == self.cores)
        self.current = most
        self._decided = self._sampled = clock()
        self._samples: list[int] = []

    def threads(self) -> int:
        """The thread count for the next step (the last answer until ``interval`` has passed)."""
        if not self.enabled:
            return self.most
        now = self._clock()
        if now - self._sampled >= self.sample_every or not self._samples:
            machine = self._runnable()
            if machine is not None:
                self._samples.append(max(0, machine - self._own_runnable()))
            self._sampled = now
        if now - self._decided < self.interval or not self._samples:
            return self.current
        others = round(sum(self._samples) / len(self._samples))
        self._samples.clear()
        self._decided = now
        free = self.cores - others
        self.current = self.most if free < 1 else min(self.most, free)
        return self.current
