"""llama.cpp's thread count follows the cores the rest of the machine leaves free (``threads.CoreShare``): on
scripted CPU counters (quick), and on a real context, whose thread count changes between steps with the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from rank1_local.backends.llama.threads import CoreShare, busy_cpu_seconds


class Counters:
    """A machine of ``cores`` cores: each tick of ``seconds``, others run ``others`` cores' worth and we run ``own``."""

    def __init__(self) -> None:
        self.now = self.machine = self.own = 0.0

    def tick(self, seconds: float, others: float, own: float) -> None:
        self.now += seconds
        self.machine += (others + own) * seconds
        self.own += own * seconds

    def share(self, most: int, cores: int, interval: float = 1.0) -> CoreShare:
        return CoreShare(most, interval=interval, cores=cores, machine_busy=lambda: self.machine,
                         own_busy=lambda: self.own, clock=lambda: self.now)


@pytest.mark.quick
def test_threads_follow_the_free_cores():
    c = Counters()
    share = c.share(most=2, cores=2)
    assert share.enabled and share.threads() == 2
    c.tick(1.0, others=0.1, own=1.9)
    assert share.threads() == 2  # an idle machine: every core
    c.tick(1.0, others=1.0, own=1.0)  # one busy process beside us
    assert share.threads() == 1
    c.tick(0.5, others=0.0, own=1.0)
    assert share.threads() == 1  # not re-read before the interval has passed
    c.tick(0.5, others=0.0, own=1.0)
    assert share.threads() == 2  # it went away
    c.tick(1.0, others=3.0, own=0.5)
    assert share.threads() == 1  # never fewer than one


@pytest.mark.quick
def test_more_cores_and_a_user_cap():
    c = Counters()
    share = c.share(most=6, cores=8)
    c.tick(1.0, others=2.6, own=5.0)
    assert share.threads() == 5  # 8 cores, 3 busy elsewhere
    c.tick(1.0, others=0.0, own=5.0)
    assert share.threads() == 6  # capped at most


@pytest.mark.quick
def test_nothing_to_read_means_the_fixed_count():
    share = CoreShare(4, cores=4, machine_busy=lambda: None)
    assert not share.enabled and share.threads() == 4
    assert not CoreShare(1, cores=4, machine_busy=lambda: 0.0).enabled  # one thread: nothing to follow


@pytest.mark.quick
def test_the_machine_counter_reads_proc_stat():
    first = busy_cpu_seconds()
    if first is None:
        pytest.skip("no /proc/stat on this system")
    sum(i * i for i in range(200_000))  # some CPU time of our own
    assert busy_cpu_seconds() >= first > 0


def test_a_context_changes_its_threads_between_steps(exported):
    from rank1_local.backends.llama.engine import BatchEntry, EngineConfig, LlamaEngine

    engine = LlamaEngine(exported("behaving", "Q8_0"), EngineConfig(kv_cells=512, n_seq_max=1))
    try:
        assert engine._share is not None  # no thread count given: the share decides
        ids = engine.tokenize("Determine if the following passage is relevant to the query.")
        entries = [BatchEntry(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)]
        c = Counters()
        engine._share = c.share(most=2, cores=2, interval=0.0)
        c.tick(1.0, others=0.0, own=2.0)
        two = np.array(engine.decode(entries)[len(ids) - 1].values, copy=True)
        assert engine.threads == 2
        engine.seq_remove(0)
        c.tick(1.0, others=1.0, own=1.0)
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
