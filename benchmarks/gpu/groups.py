"""The GPU check's steps run in process groups of their own that die with the command.

A device tool stops a command at its limit by killing the command's processes; a step started in a session of its own
(``setsid``) would outlive it, and a second call on the still-warm machine would find the first call's build still
running in the same build folder. So each step is started by :func:`spawn`:

- in a process group of its own (not a session): the driver stops a step with everything it started in one
  ``killpg`` (:func:`stop`);
- with ``PR_SET_PDEATHSIG``: when the driver dies, however it dies (SIGKILL included), the kernel sends the step's
  first process SIGTERM;

and the step's first process calls :func:`hold_group`: on SIGTERM, SIGHUP or SIGINT it stops its whole group (pip,
CMake, ninja and the compilers of a build; a step's sub-steps), SIGTERM first (ninja then removes the outputs of the
commands it was running, so a later build goes on from where this one stopped), SIGKILL two seconds later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import time
from typing import Any

PR_SET_PDEATHSIG = 1
GRACE_S = 2.0  # between SIGTERM and SIGKILL when a step stops its group


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def spawn(cmd: list[str], *, nice: int = 0, **kwargs: Any) -> subprocess.Popen:
    """Start ``cmd`` as a step: its own process group, SIGTERM when this process dies (see the module docstring);
    ``nice``: its niceness increment."""
    parent = os.getpid()
    libc = _libc()  # loaded before the fork: the child only calls it

    def in_child() -> None:
        os.setpgid(0, 0)
        if nice:
            os.nice(nice)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the driver died before the signal was set up
            os._exit(125)

    return subprocess.Popen(cmd, preexec_fn=in_child, **kwargs)


def hold_group() -> None:
    """In a step's first process: stop the whole group on SIGTERM, SIGHUP or SIGINT (see the module docstring)."""

    def stop_group(signum: int, frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
        try:
            os.killpg(0, signal.SIGTERM)
            time.sleep(GRACE_S)
        finally:
            os.killpg(0, signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop_group)


def stop(proc: subprocess.Popen, wait_s: float = 5.0) -> None:
    """Stop a step's process group: SIGTERM; once its first process has ended (or after ``wait_s``), SIGKILL to
    whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
