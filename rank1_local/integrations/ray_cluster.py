"""The Ray cluster side shared by batch scoring and serving: importing Ray (the ``ray`` extra), connecting to a cluster,
naming nodes, and checking the model on every node before anything is scored.

Nothing here imports Ray at module level: the default install and the quick tier never load it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.runs.run_header import path_bytes

logger = logging.getLogger(__name__)

AUTO = "auto"  # ``--ray`` alone: the cluster RAY_ADDRESS names, else a new local one
LOCAL = "local"  # ``--ray local``: always a new local cluster of this process's own
JOIN_TIMEOUT_S = 15.0  # joining a cluster that does not answer (or refuses us) fails after this, naming it
PROBE_TIMEOUT_S = 5.0
# The workers' output stays in Ray's logs instead of this terminal. A pooled worker that Ray reaps for idleness as the
# scoring workers start can abort in Ray's own code while it exits (absl::Mutex "Mutex corrupt", SIGABRT, "Fatal Python
# error: Aborted"), which says nothing about the run: it showed on the terminal in 1 of 8 `--ray --workers 2` runs
# here, and a plain Ray Data script whose crashing workers ran none of our code did it in 7 of 10 sessions. A worker
# that dies mid-task is reported by the driver itself, and errors come back as exceptions.
WORKER_LOGS = "the workers' output is in Ray's logs: `ray logs`, or /tmp/ray/session_latest/logs on each node"


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


@dataclass(frozen=True)
class ClusterChoice:
    """Which cluster ``--ray`` means: ``address`` to join (None: start a local one) and why, in words."""

    address: str | None
    source: str  # "--ray ADDRESS", "RAY_ADDRESS", or why a local cluster

    @property
    def named(self) -> str:
        return f"{self.address} (from {self.source})" if self.address else self.source


def choose_cluster(address: str | None = AUTO, environ: Mapping[str, str] | None = None) -> ClusterChoice:
    """``--ray``'s value as a cluster: ``local`` is always a new local cluster; ``auto`` (or nothing) joins only the
    address the user set in ``RAY_ADDRESS``, else starts a local one (never a cluster that merely runs on this
    machine: another job's); anything else is an address to join."""
    environ = os.environ if environ is None else environ
    if address in (None, "", AUTO):
        env = environ.get("RAY_ADDRESS", "").strip()
        if env and env != LOCAL:
            return ClusterChoice(env, "RAY_ADDRESS")
        return ClusterChoice(None, "no RAY_ADDRESS set: a new local cluster")
    if address == LOCAL:
        return ClusterChoice(None, "--ray local: a new local cluster")
    return ClusterChoice(address, "--ray")


def connect(address: str | None = AUTO, *, num_cpus: int | None = None, purpose: str = "running on Ray",
            join_timeout: float = JOIN_TIMEOUT_S) -> Connection:
    """Make sure this process is a Ray driver.

    - already connected (``ray.init`` was called in this process): that cluster;
    - ``"local"``: a new local cluster on this machine (``num_cpus``: all cores by default), whatever runs here;
    - ``"auto"`` (or None): the cluster ``RAY_ADDRESS`` names, else a new local cluster;
    - an address (``HOST:6379``, ``ray://HOST:10001``): that cluster.

    A cluster to join is tried for at most ``join_timeout`` seconds; one that does not answer, answers HTTP (a web
    server, not a Ray cluster), or refuses this process (another job's cluster with token authentication …) is an
    error naming the address and where it came from, never minutes of Ray's retries.
    """
    ray = require_ray(purpose)
    if ray.is_initialized():
        return Connection()
    choice = choose_cluster(address)
    if choice.address is None:
        ray.init(address=LOCAL, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        logger.info("started a local Ray cluster (%d CPUs; %s); %s", int(ray.cluster_resources().get("CPU", 0)),
                    choice.source, WORKER_LOGS)
        return Connection(started=True, owned=True)
    probe_cluster(choice)
    _join(ray, choice, join_timeout)
    logger.info("connected to the Ray cluster at %s; %s", choice.named, WORKER_LOGS)
    return Connection(owned=True)


def _join(ray: ModuleType, choice: ClusterChoice, timeout: float) -> None:
    """``ray.init(address=…)`` within ``timeout`` seconds. It runs in a helper thread because Ray retries a cluster
    that does not let it in for minutes, without a word; the main thread gives up on it after ``timeout``."""
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            ray.init(address=choice.address, log_to_driver=False)
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread
            outcome.append(exc)

    quiet = _NotMainThreadNote()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    try:
        thread = threading.Thread(target=join, name="ray-join", daemon=True)
        thread.start()
        thread.join(timeout)
    finally:
        logging.getLogger("ray._private.worker").removeFilter(quiet)
    if not outcome:
        raise Rank1Error(f"cannot join the Ray cluster at {choice.named}: no answer that lets this process in within "
                         f"{timeout:g} s (Ray's own lines above say why: another job's cluster, or one that needs a "
                         f"token?); {_alternatives(choice)}")
    exc = outcome[0]
    if exc is not None:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise Rank1Error(f"cannot join the Ray cluster at {choice.named}: {first}; {_alternatives(choice)}") from None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # what ray.init does in the main thread
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))


class _NotMainThreadNote(logging.Filter):
    """Drops Ray's note that it set no SIGTERM handler from a helper thread (:func:`_join` sets the same one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _alternatives(choice: ClusterChoice) -> str:
    unset = "unset RAY_ADDRESS or " if choice.source == "RAY_ADDRESS" else ""
    return f"{unset}use --ray local for a cluster of this process's own, or --ray HOST:PORT for another"


def probe_cluster(choice: ClusterChoice, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail at once when nothing listens at the cluster's ``HOST:PORT`` (``ray.init`` would retry for minutes), or when
    what listens there speaks HTTP/1 (a web server such as ``rank1-local serve`` or Ray's dashboard; a cluster's GCS
    and Ray Client speak gRPC)."""
    address = choice.address or ""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise Rank1Error(f"cannot join the Ray cluster at {choice.named}: {exc.strerror or exc} (is `ray start "
                         "--head` running there, and is the port open?)") from None
    with sock:
        if speaks_http(sock):
            dashboard = " (8265 is Ray's dashboard; a cluster's address is usually HOST:6379)" if port == "8265" else ""
            raise Rank1Error(f"{choice.named} is an HTTP server, not a Ray cluster{dashboard}: give the cluster's GCS "
                             "address (HOST:6379, as `ray start --head` prints it) or ray://HOST:10001 (Ray Client)")


def speaks_http(sock: socket.socket, timeout: float = 2.0) -> bool:
    """Whether the server on ``sock`` answers an HTTP/1.0 request as an HTTP server does (gRPC servers, as Ray's GCS
    and Ray Client, close the connection or answer in HTTP/2 frames)."""
    try:
        sock.settimeout(timeout)
        sock.sendall(b"HEAD / HTTP/1.0\r\nHost: rank1-local\r\n\r\n")
        return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


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
