"""``rank1-local serve --ray``: the HTTP server's ASGI app (:func:`rank1_local.server.app.create_app`, unchanged) as a
Ray Serve deployment.

Each replica is one Ray actor that owns one model (one llama.cpp context and its continuous batch) and runs the same
app as ``rank1-local serve``: the same endpoints, auth, limits, streaming and metrics. Ray Serve's proxy takes the
HTTP requests and its router hands each to a replica; with ``max_replicas`` Serve adds and removes replicas on the
number of ongoing requests. A replica that dies is replaced by Serve, and requests go to the others meanwhile.

Per replica: the model and its batch, the counters ``/metrics`` and ``/health`` report (every answer carries the
replica's id in the ``x-rank1-replica`` header), the admission limit (``--max-queue``) and the judgment cache
connection. A cache path is opened by each replica on its own node: replicas on one node share that SQLite file
(several processes may use one cache file), replicas on other nodes each have their node's file.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.engine import Lifecycle
from rank1_local.core.errors import Rank1Error
from rank1_local.integrations.ray_cluster import (
    AUTO,
    check_model_on_nodes,
    connect,
    quiet_llama_cpp,
    rank1_message,
    this_worker,
)

logger = logging.getLogger(__name__)

APP_NAME = "rank1-local"
REPLICA_HEADER = "x-rank1-replica"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads and serves: the model argument, the protocol settings, the backend and its settings
    (a typed settings object, e.g. :class:`~rank1_local.backends.llama.facade.LlamaSettings`; None: its defaults), a
    judgment cache path (each node opens its own), the GGUF type for a hub id, the HTTP settings
    (:class:`~rank1_local.server.app.ServerSettings`' fields; ``model_name`` None: the model file's stem), and the
    model card (None: each replica recognises it from the model, as ``rank1-local serve`` does)."""

    model: str
    config: ScoringConfig
    backend: str = "llama.cpp"
    settings: Any = None
    cache: str | None = None
    gguf_type: str | None = None
    server: dict[str, Any] = field(default_factory=dict)
    card: str | None = None


@dataclass(frozen=True)
class ServeOptions:
    """How Serve runs the replicas."""

    replicas: int = 1
    max_replicas: int | None = None  # autoscale between ``replicas`` and this on the ongoing requests
    target_ongoing_requests: float = 2.0  # per replica, when autoscaling
    max_ongoing_requests: int = 64  # per replica; more wait in Serve's router
    threads_per_replica: int = 1  # CPUs reserved per replica (and llama.cpp threads)
    gpus_per_replica: float = 0
    shutdown_timeout: float = 30.0  # seconds a stopping replica gives its requests in flight

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise Rank1Error(f"replicas must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise Rank1Error(f"max_replicas ({self.max_replicas}) must be at least replicas ({self.replicas})")
        if self.target_ongoing_requests <= 0:
            raise Rank1Error(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if self.max_ongoing_requests < 1:
            raise Rank1Error(f"max_ongoing_requests must be at least 1, got {self.max_ongoing_requests}")
        if self.threads_per_replica < 1:
            raise Rank1Error(f"threads_per_replica must be at least 1, got {self.threads_per_replica}")
        if self.gpus_per_replica < 0:
            raise Rank1Error(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")


class ReplicaHeader:
    """ASGI middleware: every answer says which replica gave it (``x-rank1-replica``)."""

    def __init__(self, app: Callable[..., Awaitable[None]], replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(),
                                                                                  self.replica)]}
            await send(message)

        await self.app(scope, receive, tagged)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return this_worker()


class Rank1Replica:
    """One Serve replica: loads the model once and serves :func:`~rank1_local.server.app.create_app` with it (Serve
    builds the app through ``__serve_build_asgi_app__`` after the constructor, and runs its lifespan)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from rank1_local.backends import backend_spec
        from rank1_local.server.app import ServerSettings

        quiet_llama_cpp()
        self.where = this_worker()
        try:
            self.model = backend_spec(spec.backend).open(spec.model, spec.config, spec.settings, cache=spec.cache,
                                                         gguf_type=spec.gguf_type, card=spec.card)
        except Rank1Error as exc:
            raise Rank1Error(f"{self.where}: cannot load the model: {exc}") from None
        server = dict(spec.server)
        name = server.pop("model_name", None) or self.model.model_path.stem
        self.settings = ServerSettings(model_name=name, **server)
        self.replica = _replica_id()
        logger.info("replica %s (%s): %s on %s", self.replica, self.where, self.model.model_path.name,
                    self.model.device)

    def __serve_build_asgi_app__(self) -> Any:
        from rank1_local.server.app import create_app

        return ReplicaHeader(create_app(self.model, self.settings), self.replica)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model was closed is replaced."""
        if self.model.lifecycle is not Lifecycle.OPEN:
            raise Rank1Error(f"replica {self.replica}: the model was closed")

    def __del__(self) -> None:  # after the app's lifespan has stopped the pipeline
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def rank1_deployment(options: ServeOptions = ServeOptions()) -> Any:
    """The Serve deployment: :class:`Rank1Replica` behind ``serve.ingress``, with ``options``' replicas (or
    autoscaling), resources, ongoing-request limit and graceful shutdown time."""
    from rank1_local.core.extras import require

    serve = require("ray.serve", "ray", "serving on Ray")
    deployment_options: dict[str, Any] = {
        "name": "Rank1Replica",
        "ray_actor_options": {"num_cpus": options.threads_per_replica, "num_gpus": options.gpus_per_replica},
        "max_ongoing_requests": options.max_ongoing_requests,
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
    }
    if options.max_replicas is not None:
        deployment_options["autoscaling_config"] = {
            "min_replicas": options.replicas, "initial_replicas": options.replicas,
            "max_replicas": options.max_replicas, "target_ongoing_requests": options.target_ongoing_requests}
    else:
        deployment_options["num_replicas"] = options.replicas
    return serve.deployment(**deployment_options)(serve.ingress()(Rank1Replica))


def rank1_app(spec: ReplicaSpec, options: ServeOptions = ServeOptions()) -> Any:
    """The Serve application (``serve.run(rank1_app(…))``): every replica loads and serves ``spec``."""
    return rank1_deployment(options).bind(spec)


def _serve_client() -> Any:
    """Serve's controller client when Serve runs on the cluster, else None (Ray has no public call for this)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None


def start_serving(spec: ReplicaSpec, options: ServeOptions, *, host: str, port: int) -> bool:
    """Check the model on every node that can hold a replica, then run the app on Serve (HTTP on ``host:port``) and
    return once every replica is up (an error if they cannot start). True when Serve was not running before (the
    caller stops it again)."""
    from ray import serve

    check_model_on_nodes(spec.backend, spec.model, gguf_type=spec.gguf_type,
                         cpus=options.threads_per_replica, gpus=options.gpus_per_replica)
    started = _serve_client() is None
    serve.start(http_options={"host": host, "port": port})
    client = _serve_client()
    http = getattr(client, "http_config", None)
    if http is not None and (http.host, http.port) != (host, port):  # one proxy per cluster keeps its first options
        raise Rank1Error(f"Ray Serve already runs on this cluster with its HTTP proxy on {http.host}:{http.port}; "
                         f"give --host {http.host} --port {http.port}, or stop it first (`serve shutdown`)")
    if APP_NAME in serve.status().applications:
        logger.warning("replacing the %s app already running on this cluster", APP_NAME)
    try:
        serve.run(rank1_app(spec, options), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:
        if started:
            serve.shutdown()
        raise Rank1Error(f"the replicas could not start: {rank1_message(exc)}") from None
    return started


def stop_serving(*, stop_serve: bool) -> None:
    """Delete the app (each replica gives its requests in flight its graceful shutdown time); with ``stop_serve``,
    stop Serve itself too, unless other apps run on it."""
    from ray import serve

    serve.delete(APP_NAME)
    if stop_serve and not serve.status().applications:
        serve.shutdown()


def serve_on_ray(spec: ReplicaSpec, options: ServeOptions, *, address: str | None = AUTO, host: str,
                 port: int) -> None:
    """``rank1-local serve --ray``: serve until interrupted (Ctrl-C or SIGTERM), then delete the app (each replica
    gives its requests in flight ``shutdown_timeout`` seconds) and leave the cluster."""
    connection = connect(address, purpose="rank1-local serve --ray")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        started = start_serving(spec, options, host=host, port=port)
        scaling = (f"{options.replicas} to {options.max_replicas} replicas (autoscaling)"
                   if options.max_replicas else f"{options.replicas} replica{'s' if options.replicas > 1 else ''}")
        logger.info("rank1-local serving on Ray, %s, on http://%s:%d (POST /v1/rerank)%s", scaling, host, port,
                    "" if spec.server.get("api_key") else ", no API key")
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        logger.info("shutting down: the replicas get up to %g s to finish their requests", options.shutdown_timeout)
        stop_serving(stop_serve=started or connection.started)
    finally:
        connection.close()
