"""The Ray cluster side shared by batch scoring and serving: importing Ray (the ``ray`` extra), connecting to a cluster,
naming nodes, and checking the model on every node before anything is scored.

Nothing here imports Ray at module level: the default install and the quick tier never load it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.runs.run_header import path_bytes

logger = logging.getLogger(__name__)

AUTO = "auto"  # ``--ray`` alone: the cluster this machine belongs to, else a local one


def require_ray(purpose: str) -> ModuleType:
    """``import ray``, or a :class:`~rank1_local.core.extras.MissingExtraError` naming the ``ray`` extra."""
    return require("ray", "ray", purpose)


@dataclass
class Connection:
    """This process's hold on a Ray cluster: ``started`` when it started a local cluster, ``owned`` when it called
    ``ray.init`` itself (and so must leave with :meth:`close`); a cluster joined earlier in the process stays."""

    started: bool = False
    owned: bool = False

    def close(self) -> None:
        if not self.owned:
            return
        ray = require_ray("running on Ray")
        if ray.is_initialized():
            ray.shutdown()
        self.owned = False
        if self.started:
            logger.info("stopped the local Ray cluster")


def connect(address: str | None = AUTO, *, num_cpus: int | None = None, purpose: str = "running on Ray") -> Connection:
    """Make sure this process is a Ray driver.

    - already connected (``ray.init`` was called in this process): that cluster;
    - ``"auto"`` (or None): the cluster this machine belongs to (``RAY_ADDRESS``, or one started with
      ``ray start``); if there is none, a local cluster on this machine (``num_cpus``: all cores by default);
    - an address (``HOST:6379``, ``ray://HOST:10001``): that cluster, or a clear error.
    """
    ray = require_ray(purpose)
    if ray.is_initialized():
        return Connection()
    if address in (None, "", AUTO):
        try:
            ray.init(address=AUTO, log_to_driver=True)
            logger.info("connected to the Ray cluster at %s", ray.get_runtime_context().gcs_address)
            return Connection(owned=True)
        except ConnectionError:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
            logger.info("started a local Ray cluster (%d CPUs)", int(ray.cluster_resources().get("CPU", 0)))
            return Connection(started=True, owned=True)
    _probe(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Rank1Error(f"cannot connect to the Ray cluster at {address}: {first}") from None
    logger.info("connected to the Ray cluster at %s", address)
    return Connection(owned=True)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail at once when nothing listens at ``HOST:PORT`` (``ray.init`` would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise Rank1Error(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc} (is `ray start "
                         "--head` running there, and is the port open?)") from None


def quiet_llama_cpp() -> None:
    """In a worker, whose log goes to the driver once per worker: only llama.cpp's errors (its load report arrives
    at WARNING with this llama-cpp-python's log levels, see rank1_local.backends.llama.logs)."""
    logging.getLogger("llama.cpp").setLevel(logging.ERROR)


def this_worker() -> str:
    """This process, as an error message names it: ``node 10.0.0.5 (host-a), pid 1234``."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # not in a Ray worker: the host's own name is enough
        ip = socket.gethostbyname(socket.gethostname())
    return f"node {ip} ({socket.gethostname()}), pid {os.getpid()}"


@dataclass(frozen=True)
class NodeModel:
    """What one node found when it looked for the model."""

    node: str  # ``node IP (host)``
    model_file: str  # the file (or checkpoint folder) it resolved the model argument to
    model_bytes: int


def _check_model_here(backend: str, model: str, gguf_type: str | None) -> NodeModel:
    """Runs on a node: resolve and verify the model the way the worker will (GGUF header, or a bundle's SHA-256
    manifest; a hub id resolves into this node's own cache); any failure names the node."""
    where = this_worker().rsplit(",", 1)[0]
    try:
        if backend == "llama.cpp":
            from rank1_local.models.model_files import resolve_gguf

            path = resolve_gguf(model, gguf_type=gguf_type)
        else:
            from rank1_local.models.hub import is_hub_id

            path = Path(model).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise Rank1Error(f"{path}: no config.json (not a checkpoint folder)")
            elif not is_hub_id(model):
                raise Rank1Error(f"{model}: no such checkpoint folder (and not a hub id of the form owner/name)")
    except Rank1Error as exc:
        raise Rank1Error(f"{where}: cannot use the model: {exc}") from None
    return NodeModel(where, str(path), path_bytes(path) if path.exists() else 0)


def worker_nodes(cpus: float, gpus: float) -> list[dict[str, Any]]:
    """The alive nodes that can hold a worker of ``cpus`` CPUs and ``gpus`` GPUs."""
    ray = require_ray("running on Ray")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fit = [n for n in nodes if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus]
    if not fit:
        raise Rank1Error(f"no node of the Ray cluster can hold a worker of {cpus:g} CPUs and {gpus:g} GPUs "
                         f"({len(nodes)} nodes alive)")
    return fit


def check_model_on_nodes(backend: str, model: str | Path, *, gguf_type: str | None = None, cpus: float = 1,
                         gpus: float = 0, timeout: float | None = None) -> list[NodeModel]:
    """Check on every node that can hold a worker that it finds and verifies the model, all nodes at once, before
    any worker starts. The first node that cannot fails the job with an error naming it; nodes that find files of
    different sizes are refused too (one run must score with one model)."""
    ray = require_ray("running on Ray")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0, max_retries=0)(_check_model_here)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(backend, str(model), gguf_type) for node in worker_nodes(cpus, gpus)]
    found: list[NodeModel] = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:
            raise Rank1Error(f"{len(pending)} node(s) did not finish checking the model within {timeout} s")
        try:
            found.append(ray.get(done[0]))
        except Exception as exc:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise Rank1Error(rank1_message(exc)) from None
    sizes = {f.model_bytes for f in found}
    if len(sizes) > 1:
        listing = "; ".join(f"{f.node}: {f.model_file} ({f.model_bytes} bytes)" for f in found)
        raise Rank1Error(f"the nodes do not hold the same model file: {listing}")
    for f in found:
        logger.info("%s: %s (%d bytes) checked", f.node, f.model_file, f.model_bytes)
    return found


def rank1_message(exc: BaseException) -> str:
    """The message of the :class:`Rank1Error` a Ray task or actor raised (Ray wraps it, sometimes twice, in errors
    whose text is a whole traceback), else the last line of what Ray says."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    wrapped: BaseException | None = None
    while stack:
        err = stack.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # Ray's task errors keep the original exception here
        if isinstance(err, Rank1Error) and not isinstance(cause, BaseException):
            return str(err)
        if isinstance(err, Rank1Error) and wrapped is None:
            wrapped = err
        stack += [e for e in (cause, err.__cause__, err.__context__) if isinstance(e, BaseException)]
    text = str(wrapped or exc).strip()
    ours = re.findall(r"rank1_local\.core\.errors\.\w+: (.+)", text)  # a traceback's text, e.g. an actor's death
    if ours:
        return ours[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
