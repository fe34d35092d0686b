"""Score pairs on a Ray cluster with Ray Data: a pool of actors, each owning one model.

Each actor (:class:`PairScorer`) opens the model once, through the same owner thread and pipeline as a library call
(:func:`rank1_local.backends.open_reranker`): continuous batching, shared query prefixes, duplicates judged once, and
the judgment cache when one is given (a path: one SQLite file per node, shared by the node's workers). Ray Data hands
it blocks of pairs; every block holds whole queries, so a query's prefix is evaluated once by the one actor that
scores it, never once per block.

Ray is imported inside the functions that need it (the ``ray`` extra); the actor class itself is plain Python.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rank1_local.core.cards import card_named
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, make_passage
from rank1_local.core.results import result_dict
from rank1_local.integrations.ray_cluster import check_model_on_nodes, quiet_llama_cpp, require_ray, this_worker
from rank1_local.runs.inputs import PairRow

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("qid", "query", "docid", "text", "title", "instruction")  # title and instruction may be absent/null
# the run file's row (rank1_local.core.results.result_dict), in its order
RESULT_COLUMNS = ("qid", "docid", "score", "relevant", "reasoning", "n_tokens", "forced", "truncated", "too_long",
                  "cached", "n_prompt_tokens")
# besides: the worker that scored a pair, where its model ran and the settings it scored with (Reranker.score_settings,
# as JSON)
EXTRA_COLUMNS = ("worker", "device", "settings")
PAIRS_PER_BLOCK = 128  # whole queries are packed into blocks of about this many pairs (a bigger query: its own block)
MAX_TASK_RETRIES = 3  # a block whose worker dies is retried this many times on a restarted worker, then the run fails


def pair_table(rows: Sequence[PairRow]) -> Any:
    """A pyarrow table of pairs (the dataset's input columns)."""
    import pyarrow as pa

    return pa.table({"qid": [r.qid for r in rows], "query": [r.query for r in rows],
                     "docid": [r.docid for r in rows], "text": [r.text for r in rows],
                     "title": pa.array([r.title for r in rows], pa.string()),
                     "instruction": pa.array([r.instruction for r in rows], pa.string())})


def query_blocks(rows: Sequence[PairRow], pairs_per_block: int = PAIRS_PER_BLOCK) -> list[list[PairRow]]:
    """``rows`` grouped by query id (queries in order of first appearance, pairs in input order) and packed into
    blocks of whole queries, about ``pairs_per_block`` pairs each."""
    if pairs_per_block < 1:
        raise Rank1Error(f"pairs_per_block must be at least 1, got {pairs_per_block}")
    by_query: dict[str, list[PairRow]] = {}
    for row in rows:
        by_query.setdefault(row.qid, []).append(row)
    blocks: list[list[PairRow]] = []
    current: list[PairRow] = []
    for pairs in by_query.values():
        if current and len(current) + len(pairs) > pairs_per_block:
            blocks.append(current)
            current = []
        current = current + pairs
    if current:
        blocks.append(current)
    return blocks


def block_size_for(n_pairs: int, workers: int, pairs_per_block: int = PAIRS_PER_BLOCK) -> int:
    """``pairs_per_block``, made smaller where ``n_pairs`` would fill fewer blocks than there are workers, so that
    every worker gets work (blocks still hold whole queries, so a single query stays one block)."""
    return max(1, min(pairs_per_block, math.ceil(n_pairs / max(1, workers))))


def dataset_from_rows(rows: Sequence[PairRow], pairs_per_block: int = PAIRS_PER_BLOCK) -> Any:
    """A Ray Dataset of ``rows`` whose blocks hold whole queries (pass it to :func:`score_dataset` with
    ``grouped=True``)."""
    ray = require_ray("scoring on Ray")
    return ray.data.from_arrow([pair_table(block) for block in query_blocks(rows, pairs_per_block)])


def group_by_query(ds: Any, pairs_per_block: int = PAIRS_PER_BLOCK) -> Any:
    """``ds`` re-cut so that each block holds whole queries (by ``qid``), about ``pairs_per_block`` pairs per block:
    a distributed sort by query id into that many ranges (rows with one key always land in one range). The result
    is materialized (in the object store, spilled to disk when large) before the workers start: a pool of workers
    that takes every CPU would otherwise leave the sort's tasks none to run on."""
    blocks = max(1, math.ceil(ds.count() / pairs_per_block))
    return ds.repartition(blocks).sort("qid").materialize()


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads: the backend, the model argument, the protocol settings, the backend's typed settings
    (e.g. :class:`~rank1_local.backends.llama.facade.LlamaSettings`), a judgment cache path (each node opens its own),
    the GGUF type for a hub id and the model card (None: each worker recognises it from the model, as a local run
    does)."""

    backend: str
    model: str
    config: ScoringConfig
    settings: Any
    cache: str | None = None
    gguf_type: str | None = None
    card: str | None = None


class BlockAttempts:
    """How often each block was handed to a worker, across worker restarts: a Ray actor of the driver's run (no CPU).

    Ray Data retries the block of a worker that died on its restarted worker, without end (and Ray 2.60 has no
    argument that is not deprecated to bound that), so a pair that kills its worker every time would loop forever; a
    block started more than ``1 + MAX_TASK_RETRIES`` times fails the run instead."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}

    def start(self, block: str) -> int:
        self.started[block] = self.started.get(block, 0) + 1
        return self.started[block]


class PairScorer:
    """A Ray Data worker: one model, loaded once; each call scores one block of pairs and returns its results.
    ``attempts``: a :class:`BlockAttempts` actor that counts the starts of each block (None: no bound on retries)."""

    def __init__(self, spec: WorkerSpec, attempts: Any = None, max_task_retries: int = MAX_TASK_RETRIES) -> None:
        from rank1_local.backends import backend_spec

        self.attempts, self.max_attempts = attempts, 1 + max_task_retries
        quiet_llama_cpp()
        self.where = this_worker()
        try:
            self.model = backend_spec(spec.backend).open(spec.model, spec.config, spec.settings, cache=spec.cache,
                                                         gguf_type=spec.gguf_type, card=spec.card)
        except Rank1Error as exc:
            raise Rank1Error(f"{self.where}: cannot load the model: {exc}") from None
        self.settings = json.dumps(self.model.score_settings(), sort_keys=True)
        logger.info("%s: %s loaded on %s", self.where, spec.model, self.model.device)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        columns = set(batch.column_names)
        missing = [c for c in ("qid", "query", "docid", "text") if c not in columns]
        if missing:
            raise Rank1Error(f"the dataset has no column(s) {', '.join(missing)} (needs qid, query, docid, text[, "
                             "title, instruction])")
        qids = [str(x) for x in batch.column("qid").to_pylist()]
        docids = [str(x) for x in batch.column("docid").to_pylist()]
        n = batch.num_rows
        self._count_attempt(qids)
        titles = batch.column("title").to_pylist() if "title" in columns else [None] * n
        instructions = batch.column("instruction").to_pylist() if "instruction" in columns else [None] * n
        pairs = [Pair(q, make_passage(t, title), ins) for q, t, title, ins in
                 zip(batch.column("query").to_pylist(), batch.column("text").to_pylist(), titles, instructions)]
        try:
            results = self.model.score_pairs(pairs)
        except Rank1Error as exc:
            raise Rank1Error(f"{self.where}: {exc}") from None
        rows = [result_dict(r, qid=qid, docid=docid) for r, qid, docid in zip(results, qids, docids)]
        out = {name: [row[name] for row in rows] for name in RESULT_COLUMNS} | {"worker": [self.where] * n}
        table = pa.table(out, schema=result_schema())
        for name, value in (("device", self.model.device), ("settings", self.settings)):  # one value per block
            table = table.append_column(name, pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()),
                                                                           pa.array([value])))
        return table

    def _count_attempt(self, qids: list[str]) -> None:
        """Count this start of the block (whole queries: its first query names it); refuse one started too often."""
        if self.attempts is None or not qids:
            return
        import ray

        block = f"{qids[0]}\x00{len(qids)}"
        started = ray.get(self.attempts.start.remote(block))
        if started > self.max_attempts:
            raise Rank1Error(f"the block of {len(qids)} pairs from query {qids[0]!r} was started {started} times: its "
                             f"worker died each time (out of memory, a crash in the engine?); the run stops instead "
                             "of retrying it forever")

    def __del__(self) -> None:  # the actor goes away when the dataset is done: free the model at once
        model = getattr(self, "model", None)
        if model is not None:
            try:
                model.close()
            except Exception:
                pass


def result_schema() -> Any:
    """The result columns' types (the ``settings`` column comes after them, dictionary-encoded)."""
    import pyarrow as pa

    return pa.schema([("qid", pa.string()), ("docid", pa.string()), ("score", pa.float64()),
                      ("relevant", pa.bool_()), ("reasoning", pa.string()), ("n_tokens", pa.int64()),
                      ("forced", pa.bool_()), ("truncated", pa.bool_()), ("too_long", pa.bool_()),
                      ("cached", pa.bool_()), ("n_prompt_tokens", pa.int64()), ("worker", pa.string())])


def worker_spec(backend: str, model: str | Path, config: ScoringConfig, engine: dict[str, Any],
                threads_per_worker: int) -> WorkerSpec:
    """What each worker opens: ``engine``'s values as the backend's typed settings (a name the backend does not know
    is an error now, before any worker starts; llama.cpp runs ``threads_per_worker`` threads), a judgment cache as a
    path (each node opens its own), the GGUF type and the model card (an unknown one is an error now, naming the
    cards)."""
    from rank1_local.backends import backend_spec

    values = dict(engine)
    cache, gguf_type, card = values.pop("cache", None), values.pop("gguf_type", None), values.pop("card", None)
    spec = backend_spec(backend)
    if backend == "llama.cpp":
        values["threads"] = threads_per_worker
    if cache is not None:
        if not spec.supports_cache:
            raise Rank1Error(f"the judgment cache keys on the GGUF file: llama.cpp backend only (not {backend})")
        if not isinstance(cache, (str, Path)):
            raise Rank1Error("cache= must be the path of the judgment cache file (each node opens its own)")
        cache = str(Path(cache).expanduser())
    if gguf_type is not None and not spec.takes_gguf_type:
        raise Rank1Error(f"--gguf-type picks a GGUF for llama.cpp; the {backend} backend runs checkpoints")
    if card is not None:
        card = card_named(str(getattr(card, "name", card))).name
    return WorkerSpec(backend, str(model), config, spec.settings(**values), cache, gguf_type, card)


def score_dataset(ds: Any, model: str | Path, config: ScoringConfig | None = None, *, workers: int = 1,
                  threads_per_worker: int = 1, gpus_per_worker: float = 0, backend: str = "llama.cpp",
                  cache: str | Path | None = None, grouped: bool = False, pairs_per_block: int = PAIRS_PER_BLOCK,
                  max_task_retries: int = MAX_TASK_RETRIES, check_model: bool = True, **engine: Any) -> Any:
    """Score a Ray Dataset of pairs on ``workers`` Ray actors, each owning one model; returns a Ray Dataset with the
    result columns.

    Args:
        ds: rows ``{qid, query, docid, text[, title, instruction]}`` (a pairs file's fields).
        model: a .gguf file, a bundle folder or a hub id (llama.cpp); a checkpoint folder or hub id (transformers,
            vllm). Every node must see the path (shared storage, or the same bundle copied to each node); a hub id is
            resolved by each node into its own cache. Each node checks the model now, before any worker starts.
        config: the protocol settings (default: :class:`ScoringConfig`'s).
        workers: actors (one model each). threads_per_worker: CPUs per actor (llama.cpp threads).
        gpus_per_worker: GPUs per actor (``--backend vllm|transformers``, or llama.cpp with ``n_gpu_layers``).
        cache: a judgment cache file, opened by each node for itself (llama.cpp only).
        grouped: ``ds``'s blocks already hold whole queries (:func:`dataset_from_rows`); otherwise ``ds`` is sorted
            by ``qid`` into blocks of about ``pairs_per_block`` pairs (:func:`group_by_query`).
        max_task_retries: how often a block whose worker died is retried (on the restarted worker) before the run
            fails; -1: without end.
        engine: the backend's engine settings (llama.cpp: ``parallel``, ``n_gpu_layers``, ``gguf_type`` …), and
            ``card``: the model card every worker uses (``rank1``, ``qwen3-reranker``; default: recognised from the
            model).

    Returns:
        a lazy Ray Dataset with the columns ``qid, docid, score, relevant, reasoning, n_tokens, forced, truncated,
        too_long`` (a run file's row), ``cached``, ``worker`` (the node and process that scored the pair), ``device``
        (where its model ran) and ``settings`` (the JSON of the settings it was scored with).
    """
    ray = require_ray("scoring on Ray")
    if workers < 1:
        raise Rank1Error(f"workers must be at least 1, got {workers}")
    if threads_per_worker < 1:
        raise Rank1Error(f"threads_per_worker must be at least 1, got {threads_per_worker}")
    if gpus_per_worker < 0:
        raise Rank1Error(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    config = config or ScoringConfig()
    if cache is not None:
        engine["cache"] = cache
    spec = worker_spec(backend, model, config, engine, threads_per_worker)
    if backend == "llama.cpp" and gpus_per_worker and not getattr(spec.settings, "n_gpu_layers", 0):
        logger.warning("gpus_per_worker=%g with n_gpu_layers=0: llama.cpp runs on the CPU (n_gpu_layers=-1 offloads "
                       "every layer)", gpus_per_worker)
    if check_model:
        check_model_on_nodes(backend, model, gguf_type=spec.gguf_type, cpus=threads_per_worker,
                             gpus=gpus_per_worker)
    missing = [c for c in ("qid", "query", "docid", "text") if c not in ds.columns()]
    if missing:
        raise Rank1Error(f"the dataset has no column(s) {', '.join(missing)} (needs qid, query, docid, text[, title, "
                         "instruction])")
    if not grouped:
        ds = group_by_query(ds, pairs_per_block)
    # a worker per block at most: Ray Data warns about a pool larger than its inputs, whose extra workers would only
    # load the model and wait
    pool = max(1, min(workers, ds.num_blocks()))
    # Ray Data restarts a dead worker and retries its block by itself, without end; BlockAttempts bounds the retries
    attempts = ray.remote(num_cpus=0)(BlockAttempts).remote() if max_task_retries >= 0 else None
    return ds.map_batches(
        PairScorer, fn_constructor_args=(spec, attempts, max_task_retries), batch_size=None, batch_format="pyarrow",
        zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=threads_per_worker,
        num_gpus=gpus_per_worker or None)


def result_rows(batch: Any) -> Iterable[dict[str, Any]]:
    """A result batch's rows in the run file's format (:func:`rank1_local.core.results.result_dict`)."""
    columns = {name: batch.column(name).to_pylist() for name in RESULT_COLUMNS}
    for i in range(batch.num_rows):
        yield {name: columns[name][i] for name in RESULT_COLUMNS}
