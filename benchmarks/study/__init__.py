"""``rank1-bench study``: a quantization study a researcher can run on their own model and data.

Modules, in the order data flows: :mod:`~benchmarks.study.inputs` (pairs and qrels from a pairs file, a BEIR folder
with a first-stage run, ir_datasets or MTEB), :mod:`~benchmarks.study.exports` (one export per type, cached),
:mod:`~benchmarks.study.scoring` (scoring jobs and the scorer seam), :mod:`~benchmarks.study.study` (the resumable
orchestration), :mod:`~benchmarks.study.statistics` (pure statistics), :mod:`~benchmarks.study.analysis` (the
per-type results), :mod:`~benchmarks.study.operating_points` (every budget × type × prefilter cut, the Pareto
frontier, a latency target's best point) and :mod:`~benchmarks.study.report` (study.md, study.json, study.png).
"""
