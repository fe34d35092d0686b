"""The ``--ray`` flags of ``rank1-local rerank`` and ``rank1-local serve``, and the two commands on a Ray cluster
(``pip install 'rank1-local[ray]'``; Ray is imported only when ``--ray`` is given)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.integrations.ray_batch import PAIRS_PER_BLOCK
from rank1_local.integrations.ray_cluster import JOIN_TIMEOUT_S

if TYPE_CHECKING:
    from rank1_local.cli.main import BackendChoice

RAY_HELP = ("run on a Ray cluster (pip install 'rank1-local[ray]'): alone or 'auto', the cluster RAY_ADDRESS names, "
            "else a new local one (never another job's cluster on this machine); 'local', always a new local one; or "
            f"the cluster at ADDRESS (HOST:6379, ray://HOST:10001). A cluster that does not let this process in within "
            f"{JOIN_TIMEOUT_S:g} s is an error naming it")


def _ray_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|local|ADDRESS", help=RAY_HELP)


def add_ray_rerank_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray", "score --pairs on a Ray cluster, one model per worker")
    _ray_arg(g)  # type: ignore[arg-type]
    g.add_argument("--workers", type=int, default=None, help="--ray: workers, each with its own model (default 1)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="--ray: CPUs reserved per worker, and llama.cpp's threads (default --threads, else 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="--ray: GPUs per worker (vllm, transformers; llama.cpp with --n-gpu-layers)")
    g.add_argument("--pairs-per-block", type=int, default=None,
                   help=f"--ray: whole queries are packed into blocks of about this many pairs (default "
                        f"{PAIRS_PER_BLOCK}); a block is the unit a worker scores and the driver writes")


def add_ray_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray", "serve on Ray Serve, one model per replica")
    _ray_arg(g)  # type: ignore[arg-type]
    g.add_argument("--replicas", type=int, default=None, help="--ray: replicas, each with its own model (default 1)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="--ray: autoscale between --replicas and this many on the ongoing requests")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="--ray with --max-replicas: ongoing requests per replica that autoscaling aims at (default 2)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="--ray: requests a replica takes at once; more wait in Serve's router (default 64)")
    g.add_argument("--gpus-per-replica", type=float, default=None, help="--ray: GPUs per replica (with --n-gpu-layers)")


_RERANK_ONLY = ("workers", "threads_per_worker", "gpus_per_worker", "pairs_per_block")
_SERVE_ONLY = ("replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests", "gpus_per_replica")


def uses_ray(args: argparse.Namespace) -> bool:
    """Whether the command runs on Ray; a Ray-only flag without ``--ray`` is an error."""
    if getattr(args, "ray", None) is not None:
        return True
    given = [name for name in _RERANK_ONLY + _SERVE_ONLY if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise Rank1Error(f"{flags} need{'s' if len(given) == 1 else ''} --ray")
    return False


def _at_least(value: int | None, default: int, flag: str) -> int:
    value = default if value is None else value
    if value < 1:
        raise Rank1Error(f"{flag} must be at least 1, got {value}")
    return value


def _engine(choice: BackendChoice) -> dict[str, Any]:
    """The chosen backend's settings as keywords for the workers (the cache as a path each node opens), with the GGUF
    type and the model card when given."""
    engine = {k: v for k, v in asdict(choice.settings).items() if v is not None}
    if choice.gguf_type is not None:
        engine["gguf_type"] = choice.gguf_type
    if choice.card is not None:
        engine["card"] = choice.card
    if choice.cache is not None:
        engine["cache"] = str(choice.cache)
    return engine


def rerank_on_ray(args: argparse.Namespace, config: ScoringConfig, choice: BackendChoice) -> int:
    """``rank1-local rerank --pairs PATH_OR_GLOB --output OUT --ray …``."""
    from rank1_local.integrations.ray_run_file import score_pairs_file_on_ray

    if args.pairs is None or args.output is None:
        raise Rank1Error("--ray scores a pairs file: give --pairs PATH_OR_GLOB --output OUT.jsonl")
    workers = _at_least(args.workers, 1, "--workers")
    threads = _at_least(args.threads_per_worker, getattr(args, "threads", None) or 1, "--threads-per-worker")
    gpus = args.gpus_per_worker or 0.0
    if gpus < 0:
        raise Rank1Error(f"--gpus-per-worker must be >= 0, got {gpus}")
    block = _at_least(args.pairs_per_block, PAIRS_PER_BLOCK, "--pairs-per-block")
    engine = _engine(choice)
    score_pairs_file_on_ray(args.pairs, Path(args.output), str(args.model), config, address=args.ray,
                            backend=args.backend, engine=engine, workers=workers, threads_per_worker=threads,
                            gpus_per_worker=gpus, pairs_per_block=block, progress=not args.quiet,
                            force_resume=args.force_resume)
    return 0


def serve_on_ray(args: argparse.Namespace, config: ScoringConfig, choice: BackendChoice,
                 server: dict[str, Any]) -> int:
    """``rank1-local serve --ray … --replicas N``: ``server`` holds the HTTP settings (ServerSettings' fields)."""
    from rank1_local.integrations.ray_serve import ReplicaSpec, ServeOptions
    from rank1_local.integrations.ray_serve import serve_on_ray as run

    settings = choice.settings
    threads = _at_least(getattr(settings, "threads", None), 1, "--threads")
    if hasattr(settings, "threads"):  # llama.cpp's threads: the CPUs each replica reserves
        settings = dataclasses.replace(settings, threads=threads)
    options = ServeOptions(replicas=_at_least(args.replicas, 1, "--replicas"), max_replicas=args.max_replicas,
                           target_ongoing_requests=args.target_ongoing_requests or 2.0,
                           max_ongoing_requests=_at_least(args.max_ongoing_requests, 64, "--max-ongoing-requests"),
                           threads_per_replica=threads, gpus_per_replica=args.gpus_per_replica or 0.0,
                           shutdown_timeout=server.get("shutdown_timeout", 30.0))
    spec = ReplicaSpec(str(args.model), config, choice.spec.name, settings,
                       str(choice.cache) if choice.cache is not None else None, choice.gguf_type, server, choice.card)
    run(spec, options, address=args.ray, host=args.host, port=args.port)
    return 0
