"""How llama.cpp's CPU threads wait, set before its OpenMP runtime loads.

llama.cpp's CPU backend runs every operation of a decode step on an OpenMP team, and between operations the threads
wait at a barrier. By default GNU OpenMP spins there for a while before sleeping: on an idle machine that saves a
wake-up, but when anything else runs (a browser, a second job, Ray workers) the spinning threads take the cores the
working ones need, and a step can take many times longer. The default here is to spin briefly and then sleep: on the
2-core machine of ``benchmarks/results/busy.md`` it keeps throughput within 0.8 of the best setting with one or two
busy processes beside it, at no measurable cost when the machine is idle. A user's own ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` is left as it is.
"""

from __future__ import annotations

import os

# GNU OpenMP's spin count before a waiting thread sleeps (its default: 300,000; with OMP_WAIT_POLICY=PASSIVE, 0)
SPIN_COUNT = "10000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_openmp_waiting() -> None:
    """Set the waiting default in the environment, unless the user set either variable; call it before
    llama.cpp's libraries are first loaded (the OpenMP runtime reads them once, when it loads)."""
    if not any(name in os.environ for name in WAIT_VARIABLES):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
