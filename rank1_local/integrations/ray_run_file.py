"""``rank1-local rerank --pairs … --output OUT --ray``: a pairs file (or a glob of them) scored on a Ray cluster into
one run file, the same format as a single-process run, resumable, exactly once.

- **Before anything starts**: every pairs file is read and every pair validated on the driver (the same reader and
  text checks as a single-process run); pairs already in ``OUT`` are skipped (resume); every node that can hold a
  worker checks the model; a resumed run's header must name the same model, backend and protocol settings.
- **Output**: the driver streams result blocks from Ray Data (``iter_batches``) and appends their rows to ``OUT``
  (one write and one fsync per block), so no more than a few blocks are ever held on the driver, and one process
  writes the file (it holds the output's lock: a second driver on the same ``OUT`` stops at once, naming the first). It keeps the keys written: a block that comes back twice (a retried task) adds nothing, and a run
  that ends with a pair missing says so. Exactly once, whatever workers fail.
- **Header**: written as soon as the first block arrives, before its rows (so a killed driver leaves one to check
  against), with the settings the workers report; a block scored with other settings stops the run before its rows
  are written. Its ``pairs`` is the number of rows in the file, whatever runs were killed before.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, formatted
from rank1_local.integrations.ray_batch import (
    PAIRS_PER_BLOCK,
    block_size_for,
    dataset_from_rows,
    result_rows,
    score_dataset,
)
from rank1_local.integrations.ray_cluster import (
    AUTO,
    WORKER_LOGS,
    NodeModel,
    check_model_on_nodes,
    connect,
    rank1_message,
)
from rank1_local.runs.inputs import PairRow, read_pairs
from rank1_local.runs.run_header import RunHeader, start_run
from rank1_local.runs.run_output import RunOutput

logger = logging.getLogger(__name__)

def pair_files(pattern: str | Path) -> list[Path]:
    """The pairs files ``pattern`` names: one file, or every file a glob matches (sorted)."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if glob.has_magic(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if files:
            return files
        raise Rank1Error(f"{pattern}: no pairs file matches")
    raise Rank1Error(f"{path}: no such file")


def read_all_pairs(files: list[Path]) -> list[PairRow]:
    """Every pair of every file, each (qid, docid) once across all of them."""
    rows: list[PairRow] = []
    first: dict[tuple[str, str], Path] = {}
    for path in files:
        for row in read_pairs(path):
            key = (row.qid, row.docid)
            if key in first:
                raise Rank1Error(f"{path}: (qid, docid) ({row.qid!r}, {row.docid!r}) is also in {first[key]}; "
                                 "each pair is one row of the output")
            first[key] = path
            rows.append(row)
    return rows


def validate_rows(rows: list[PairRow], config: ScoringConfig) -> None:
    """The text checks every backend makes (query, passage, instruction: strings, valid UTF-8, a non-empty query),
    on the driver, so that a bad pair fails the run before any worker starts."""
    if config.prompt_template is not None:
        formatted(Pair("q", "p"), 0, config.prompt_template)  # the template itself
    for i, row in enumerate(rows):
        try:
            formatted(Pair(row.query, row.passage, row.instruction), i, config.prompt_template)
        except Rank1Error as exc:
            raise Rank1Error(f"pair (qid {row.qid!r}, docid {row.docid!r}): {exc}") from None


def _check_resumable(run: RunOutput, model: NodeModel, backend: str, config: ScoringConfig) -> None:
    """Before any worker starts: a resumed run must have been made with the same model file, backend and protocol
    settings (what only a loaded model knows, e.g. a transformers dtype, is checked on the first block)."""
    old = run.header
    if old is None:
        return
    settings = config.to_dict() | {k: v for k, v in old.settings.items() if k not in config.to_dict()}
    start_run(run.path, RunHeader(model=old.model, model_file=model.model_file, model_bytes=model.model_bytes,
                                  backend=backend, device=old.device, settings=settings), resuming=True)


class _Run:
    """The driver's side of one run: the header, the keys written, the tokens."""

    def __init__(self, output: RunOutput, model_arg: str, model: NodeModel, backend: str, workers: int,
                 todo: list[PairRow]) -> None:
        self.output, self.model_arg, self.model, self.backend, self.workers = output, model_arg, model, backend, workers
        self.expected = {(r.qid, r.docid) for r in todo}
        self.written: set[tuple[str, str]] = set()
        self.settings_json: str | None = None
        self.all_tokens = 0

    def accept(self, batch: Any) -> int:
        """Append the batch's rows not written yet, and say how many (the header is written before the first batch's
        rows, and every batch must have been scored with its settings)."""
        settings = set(batch.column("settings").to_pylist())
        devices = set(batch.column("device").to_pylist())
        worker = batch.column("worker")[0].as_py() if batch.num_rows else "?"
        if len(settings) > 1:
            raise Rank1Error(f"one block was scored with two different settings ({worker})")
        if not settings:
            return 0
        (settings_json,) = settings
        if self.settings_json is None:
            self.output.begin(RunHeader(model=self.model_arg, model_file=self.model.model_file,
                                        model_bytes=self.model.model_bytes, backend=self.backend,
                                        device=f"{next(iter(devices))} x {self.workers} Ray workers",
                                        settings=json.loads(settings_json)))
            self.settings_json = settings_json
        elif settings_json != self.settings_json:
            raise Rank1Error(f"{worker} scored with settings {settings_json}, but this run's are {self.settings_json}"
                             "; every node must run the same model build and backend")
        rows, tokens = [], 0
        for row in result_rows(batch):
            key = (row["qid"], row["docid"])
            if key not in self.expected:
                logger.warning("a worker returned a pair that was not asked for: %s", key)
                continue
            if key in self.written:  # a retried block: its rows are in the file already
                continue
            self.written.add(key)
            rows.append(row)
            if not row["cached"]:
                tokens += row["n_tokens"]
        self.all_tokens += tokens
        self.output.append(rows, tokens=tokens)
        return len(rows)


def score_pairs_file_on_ray(pairs: str | Path, output: Path, model: str | Path, config: ScoringConfig, *,
                            address: str | None = AUTO, backend: str = "llama.cpp",
                            engine: dict[str, Any] | None = None, workers: int = 1, threads_per_worker: int = 1,
                            gpus_per_worker: float = 0, pairs_per_block: int = PAIRS_PER_BLOCK,
                            progress: bool = True, force_resume: bool = False) -> int:
    """Score the pairs of ``pairs`` (a file or a glob) not yet in ``output`` on a Ray cluster (``address``: see
    :func:`~rank1_local.integrations.ray_cluster.connect`); returns how many were scored now."""
    engine = dict(engine or {})
    files = pair_files(pairs)
    rows = read_all_pairs(files)
    validate_rows(rows, config)
    with RunOutput(output, files, force_resume=force_resume) as out:
        todo = [r for r in rows if (r.qid, r.docid) not in out.done]
        logger.info("%d pairs, %d already in %s, %d to score", len(rows), len(rows) - len(todo), output, len(todo))
        if not todo:
            return 0
        connection = connect(address, purpose="rank1-local rerank --ray")
        try:
            nodes = check_model_on_nodes(backend, model, gguf_type=engine.get("gguf_type"), cpus=threads_per_worker,
                                         gpus=gpus_per_worker)
            _check_resumable(out, nodes[0], backend, config)
            run = _Run(out, str(model), nodes[0], backend, workers, todo)
            per_block = block_size_for(len(todo), workers, pairs_per_block)
            scored = score_dataset(dataset_from_rows(todo, per_block), model, config, workers=workers,
                                   threads_per_worker=threads_per_worker, gpus_per_worker=gpus_per_worker,
                                   backend=backend, grouped=True, check_model=False, **engine)
            scored.context.enable_progress_bars = False
            try:
                with tqdm(total=len(todo), unit="pair", disable=not progress) as bar:
                    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                        new = run.accept(batch)
                        elapsed = bar.format_dict["elapsed"] or 1e-9  # the rate set before the count is drawn
                        bar.set_postfix(tok_s=f"{run.all_tokens / elapsed:.1f}", refresh=False)
                        bar.update(new)
            except Rank1Error:
                raise
            except Exception as exc:
                raise Rank1Error(f"the Ray run failed: {rank1_message(exc)} ({WORKER_LOGS})") from None
        finally:
            connection.close()
    missing = run.expected - run.written
    if missing:
        raise Rank1Error(f"{len(missing)} pairs came back from no worker (e.g. {sorted(missing)[0]}); run the same "
                         "command again to score them")
    logger.info("%d pairs scored on %d Ray workers into %s", len(run.written), workers, output)
    return len(run.written)
