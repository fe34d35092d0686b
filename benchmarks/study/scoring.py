"""Scoring a study's runs: one :class:`ScoringJob` per model (the reference and every export), run by a *scorer*.

A job scores the study's pairs file into a run file with :func:`rank1_local.runs.run_file.score_pairs_file`: rows are
appended as pairs finish and a re-run scores only the pairs the file lacks, so a study killed at any point picks up
where it stopped and never scores a pair twice.

The scorer is the seam between the study and where models run:

- :func:`subprocess_scorer` (the default) runs each job in its own Python process (``python -m
  benchmarks.study.job JOB.json``): the peak memory of each model is measured on its own, and the reference can
  run in another virtualenv (vLLM pins its own transformers);
- :func:`ray_scorer` (``--ray``) hands the same job to the Ray integration: workers on the cluster score, this process
  writes the run file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.runs.atomic import write_text_atomic

logger = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding benchmarks/ (and rank1_local/ in a checkout)


@dataclass(frozen=True)
class ScoringJob:
    """Score ``pairs_file`` into ``run_file`` with ``model`` on ``backend`` (``llama.cpp``, ``transformers`` or
    ``vllm``), its engine ``settings``, the protocol ``config`` (a :class:`ScoringConfig` as a dict) and the model
    ``card`` (None: recognised from the model)."""

    name: str
    backend: str
    model: str
    settings: dict[str, Any]
    config: dict[str, Any]
    pairs_file: str
    run_file: str
    python: str | None = None  # the interpreter to run it with (vLLM's own virtualenv); None: this one
    env: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    card: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Scorer = Callable[[ScoringJob], None]


def job_record_path(run_file: Path) -> Path:
    """Beside each run file: its peak memory and sessions (``RUN.job.json``)."""
    return run_file.with_name(run_file.name.removesuffix(".jsonl") + ".job.json")


def read_job_record(run_file: Path) -> dict[str, Any]:
    path = job_record_path(run_file)
    if not path.exists():
        return {"sessions": []}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {"sessions": []}


def record_session(run_file: Path, pairs: int, peak_rss_bytes: int) -> None:
    """Add one scoring session (pairs scored, the process's peak resident memory) to the job record."""
    record = read_job_record(run_file)
    record["sessions"].append({"pairs": pairs, "peak_rss_bytes": peak_rss_bytes})
    record["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in record["sessions"])
    write_text_atomic(job_record_path(run_file), json.dumps(record, indent=2) + "\n")


def subprocess_scorer(job: ScoringJob) -> None:
    """Run ``job`` in a fresh Python process; an error there is an error here, naming the job."""
    job_file = Path(job.run_file).with_name(Path(job.run_file).name.removesuffix(".jsonl") + ".job-spec.json")
    write_text_atomic(job_file, json.dumps(job.to_json(), indent=2) + "\n")
    python = job.python or sys.executable
    env = {**os.environ, **job.env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    logger.info("%s: scoring with %s (%s)", job.name, job.backend, Path(job.model).name)
    result = subprocess.run([python, "-m", "benchmarks.study.job", str(job_file)], env=env)
    if result.returncode != 0:
        rows = rows_written(Path(job.run_file))
        kept = (f"the {rows} row{'s' if rows != 1 else ''} already in {job.run_file} are kept, re-run the study to "
                "resume" if rows else "no row was written; re-run the study once the cause above is fixed")
        raise Rank1Error(f"{job.name}: scoring failed (exit status {result.returncode}); {kept}")


def rows_written(run_file: Path) -> int:
    """How many scored rows ``run_file`` holds (0 when there is none, or it cannot be read)."""
    from rank1_local.runs.inputs import done_keys

    try:
        return len(done_keys(run_file)) if run_file.exists() else 0
    except Rank1Error:
        return 0


@dataclass(frozen=True)
class RayOptions:
    """Where and how to score on Ray: ``address`` ("auto": the cluster RAY_ADDRESS names, else a new local one; "local";
    HOST:6379, ray://HOST:10001), and per scoring job the workers, each with its own model."""

    address: str = "auto"
    workers: int = 1
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0
    pairs_per_block: int | None = None

    def __post_init__(self) -> None:
        for name in ("workers", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise Rank1Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise Rank1Error(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.pairs_per_block is not None and self.pairs_per_block < 1:
            raise Rank1Error(f"--pairs-per-block must be at least 1, got {self.pairs_per_block}")


def ray_scorer(options: RayOptions) -> Scorer:
    """Every job on a Ray cluster through the Ray integration
    (:func:`rank1_local.integrations.ray_run_file.score_pairs_file_on_ray`): workers score the pairs the run file
    lacks and stream their rows back; this process appends them and keeps the header, so resuming works as in a
    local run, exactly once. The cluster is joined (or a local one started) at the first job and kept for the rest.
    The workers run their cluster's Python: ``--vllm-python`` does not apply, vLLM must be installed there."""
    from rank1_local.integrations.ray_cluster import require_ray

    require_ray("rank1-bench study --ray")  # a missing extra is refused before anything runs
    held: list[Any] = []

    def score(job: ScoringJob) -> None:
        from rank1_local.core.config import ScoringConfig
        from rank1_local.integrations.ray_batch import PAIRS_PER_BLOCK
        from rank1_local.integrations.ray_cluster import connect
        from rank1_local.integrations.ray_run_file import score_pairs_file_on_ray

        if not held:
            held.append(connect(options.address, purpose="rank1-bench study --ray"))
        if job.python:
            logger.info("%s: on Ray the workers' own Python runs %s (not %s)", job.name, job.backend, job.python)
        engine = {k: v for k, v in job.settings.items() if k != "threads"}  # llama.cpp: threads per worker
        if job.card is not None:
            engine["card"] = job.card
        logger.info("%s: scoring on Ray with %s (%s), %d worker(s)", job.name, job.backend, Path(job.model).name,
                    options.workers)
        score_pairs_file_on_ray(job.pairs_file, Path(job.run_file), job.model, ScoringConfig(**job.config),
                                address=options.address, backend=job.backend, engine=engine,
                                workers=options.workers, threads_per_worker=options.threads_per_worker,
                                gpus_per_worker=options.gpus_per_worker,
                                pairs_per_block=options.pairs_per_block or PAIRS_PER_BLOCK, progress=job.progress)

    return score


def make_scorer(ray: RayOptions | None) -> Scorer:
    return ray_scorer(ray) if ray is not None else subprocess_scorer
