"""The pipeline layer: the one path from input pairs to results (:class:`Pipeline`, every backend's
:class:`~rank1_local.core.engine.ScoringEngine`), the tickets that carry a call's results back, admission, and the
owner threads that run each backend's model.

- :mod:`~rank1_local.pipeline.stages`: :class:`Pipeline`, its stages, the :class:`Executor` protocol;
- :mod:`~rank1_local.pipeline.tickets`: :class:`Ticket`, :class:`Stopped`;
- :mod:`~rank1_local.pipeline.admission`: :class:`Overloaded`, :class:`TooLarge`;
- :mod:`~rank1_local.pipeline.counters`: totals and latency histograms;
- :mod:`~rank1_local.pipeline.work_queue`: the queue between callers and an owner thread;
- :mod:`~rank1_local.pipeline.owner`, :mod:`~rank1_local.pipeline.serial`: the owner threads.
"""

from rank1_local.pipeline.admission import Overloaded, TooLarge
from rank1_local.pipeline.stages import Executor, Pipeline
from rank1_local.pipeline.tickets import Cancelled, Stopped, Tally, Ticket

__all__ = ["Cancelled", "Executor", "Overloaded", "Pipeline", "Stopped", "Tally", "Ticket", "TooLarge"]
