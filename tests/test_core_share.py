"""llama.cpp's thread count follows the cores the rest of the machine leaves free (``threads.CoreShare``): on
scripted runnable-thread counts (quick), and on a real context, whose thread count changes between steps with the same logits."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from rank1_local.backends.llama.threads import CoreShare, own_runnable_threads, runnable_threads


class Machine:
    """A scripted machine: ``others`` threads of other processes and ``own`` of ours are runnable; ``tick`` moves the
    clock."""

    def __init__(self) -> None:
        self.now, self.others, self.own = 0.0, 0, 1

    def tick(self, seconds: float, others: int | None = None) -> None:
        self.now += seconds
        if others is not None:
            self.others = others

    def share(self, most: int, cores: int, interval: float = 1.0, sample_every: float = 0.05) -> CoreShare:
        return CoreShare(most, interval=interval, sample_every=sample_every, cores=cores,
                         runnable=lambda: self.others + self.own, own_runnable=lambda: self.own,
                         clock=lambda: self.now)


def run_for(machine: Machine, share: CoreShare, seconds: float, others: int, step: float = 1 / 64) -> int:
    """Steps of ``step`` seconds (exact in binary, so the windows do not drift) for ``seconds``, with ``others``
    runnable threads elsewhere: the last thread count."""
    threads = share.threads()
    for _ in range(round(seconds / step)):
        machine.tick(step, others)
        threads = share.threads()
    return threads


@pytest.mark.quick
def test_threads_follow_the_free_cores():
    m = Machine()
    share = m.share(most=2, cores=2)
    assert share.enabled and share.threads() == 2
    assert run_for(m, share, 1.0, others=0) == 2  # an idle machine: every core
    assert run_for(m, share, 1.0, others=1) == 1  # one busy process beside us: the core it leaves
    assert run_for(m, share, 0.5, others=0) == 1  # not re-read before the interval has passed
    assert run_for(m, share, 0.5, others=0) == 2  # it went away
    assert run_for(m, share, 1.0, others=2) == 2  # no core free: every thread, for a fair share of the slices
    assert run_for(m, share, 1.0, others=5) == 2


@pytest.mark.quick
def test_the_decision_is_the_mean_of_the_samples():
    m = Machine()
    share = m.share(most=2, cores=2)
    m.own = 3  # our own runnable threads (spinning OpenMP threads, a server thread) are not the others'
    threads = share.threads()
    for i in range(100):  # a second where another thread is runnable a fifth of the time
        m.tick(0.01, others=1 if i % 5 == 0 else 0)
        threads = share.threads()
    assert threads == 2
    calls = []
    sampled = CoreShare(2, cores=2, sample_every=0.05, runnable=lambda: calls.append(1) or 1, own_runnable=lambda: 1,
                        clock=lambda: m.now)
    calls.clear()
    for _ in range(100):
        m.tick(0.01)
        sampled.threads()
    assert 19 <= len(calls) <= 21  # read at most every sample_every, not every step


@pytest.mark.quick
def test_more_cores_and_a_user_cap():
    m = Machine()
    share = m.share(most=6, cores=8)
    assert run_for(m, share, 1.0, others=3) == 5  # 8 cores, 3 busy elsewhere
    assert run_for(m, share, 1.0, others=0) == 6  # capped at most
    assert run_for(m, share, 1.0, others=7) == 1
    assert run_for(m, share, 1.0, others=8) == 6


@pytest.mark.quick
def test_nothing_to_read_means_the_fixed_count():
    share = CoreShare(4, cores=4, runnable=lambda: None)
    assert not share.enabled and share.threads() == 4
    assert not CoreShare(1, cores=4, runnable=lambda: 0).enabled  # one thread: nothing to follow


@pytest.mark.quick
def test_the_counters_read_proc():
    machine = runnable_threads()
    if machine is None:
        pytest.skip("no /proc/loadavg on this system")
    assert machine >= 1  # this thread runs
    assert own_runnable_threads() >= 1
    stop = threading.Event()
    block = bytes(1 << 24)

    def spin() -> None:  # hashing releases the GIL: the thread stays runnable beside this one
        while not stop.is_set():
            hashlib.sha256(block).digest()

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        assert max(own_runnable_threads() for _ in range(50)) >= 2
    finally:
        stop.set()
        spinner.join()


def test_a_context_changes_its_threads_between_steps(exported):
    from rank1_local.backends.llama.engine import BatchEntry, EngineConfig, LlamaEngine

    engine = LlamaEngine(exported("behaving", "Q8_0"), EngineConfig(kv_cells=512, n_seq_max=1))
    try:
        assert engine._share is not None  # no thread count given: the share decides
        ids = engine.tokenize("Determine if the following passage is relevant to the query.")
        entries = [BatchEntry(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)]
        m = Machine()
        engine._share = m.share(most=2, cores=2, interval=0.0, sample_every=0.0)
        m.tick(1.0, others=0)
        two = np.array(engine.decode(entries)[len(ids) - 1].values, copy=True)
        assert engine.threads == 2
        engine.seq_remove(0)
        m.tick(1.0, others=1)
        one = np.array(engine.decode(entries)[len(ids) - 1].values, copy=True)
        assert engine.threads == 1
        np.testing.assert_allclose(one, two, atol=1e-3)
    finally:
        engine.close()
    fixed = LlamaEngine(exported("behaving", "Q8_0"), EngineConfig(kv_cells=512, n_seq_max=1, n_threads=2))
    try:
        assert fixed._share is None  # the user's thread count is kept
    finally:
        fixed.close()
