"""rank1 on a Ray cluster (``pip install 'rank1-local[ray]'``): batch scoring with Ray Data and serving with Ray Serve.

- :func:`score_dataset`: a Ray Dataset of pairs scored by a pool of actors, each owning one model (the library's own
  owner thread and pipeline: continuous batching, shared prefixes, duplicates judged once, the judgment cache);
  blocks hold whole queries, so each query's prefix is evaluated once.
- :func:`score_pairs_file_on_ray`: ``rank1-local rerank --pairs … --output OUT --ray``: pairs files into one run
  file, validated on the driver, resumable, exactly once whatever workers fail.
- :func:`rank1_app` / :func:`serve_on_ray`: ``rank1-local serve --ray``: the server's ASGI app as a Serve
  deployment, one model per replica.

Ray itself is imported only when one of these runs: importing this module does not load it.
"""

from __future__ import annotations

from rank1_local.integrations.ray_batch import (
    PAIRS_PER_BLOCK,
    PairScorer,
    WorkerSpec,
    dataset_from_rows,
    group_by_query,
    query_blocks,
    score_dataset,
)
from rank1_local.integrations.ray_cluster import AUTO, Connection, check_model_on_nodes, connect
from rank1_local.integrations.ray_run_file import score_pairs_file_on_ray
from rank1_local.integrations.ray_serve import (
    ReplicaSpec,
    ServeOptions,
    rank1_app,
    rank1_deployment,
    serve_on_ray,
    start_serving,
    stop_serving,
)

__all__ = [
    "AUTO", "PAIRS_PER_BLOCK", "Connection", "PairScorer", "ReplicaSpec", "ServeOptions", "WorkerSpec",
    "check_model_on_nodes", "connect", "dataset_from_rows", "group_by_query", "query_blocks", "rank1_app",
    "rank1_deployment", "score_dataset", "score_pairs_file_on_ray", "serve_on_ray", "start_serving", "stop_serving",
]
