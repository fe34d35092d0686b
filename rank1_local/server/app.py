"""The HTTP server's ASGI application (FastAPI): rerank endpoints, health, models, metrics and the playground page.

The server speaks only to the model's :class:`~rank1_local.core.engine.ScoringEngine` (``model.engine``), so any
backend can be served: every request's pairs go through it to the one thread that owns the model (for llama.cpp, in
one continuous batch with every other request's); the handler takes its results from its ticket as they arrive (or
streams them as server-sent events) and cancels its pairs when the client goes away. Bad input is answered with a clear
message (401 auth, 413 over a limit, 422 invalid, 503 with ``Retry-After`` when too many pairs wait already) and never
reaches the batch. The app's state (model, settings, counters) lives on ``app.state.server``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from rank1_local.core.engine import ScoringEngine, TicketView
from rank1_local.core.errors import Rank1Error
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import Rank1Result
from rank1_local.pipeline import Overloaded, Stopped, TooLarge
from rank1_local.server.auth import check_api_key
from rank1_local.server.metrics import RateWindow, render
from rank1_local.server.playground import add_playground
from rank1_local.server.schema import RerankRequest, error_body, rerank_response, result_row
from rank1_local.version import __version__

logger = logging.getLogger(__name__)

RERANK_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")
HEARTBEAT_S = 1.0  # an SSE comment while no result is ready (keeps proxies open, notices closed clients)
POLL_S = 0.25  # how often a waiting request checks that its client is still there
SHUTDOWN_REASON = "the server shut down before this request finished"


@dataclass(frozen=True)
class ServerSettings:
    """Settings of the HTTP layer (the model's settings are the model's)."""

    model_name: str
    api_key: str | None = None
    max_documents: int = 1000
    max_total_chars: int = 2_000_000
    max_body_bytes: int = 16 * 1024 * 1024
    shutdown_timeout: float = 30.0
    read_timeout: float = 30.0  # seconds a client gets for a request's headers, and again for its body
    max_connections: int = 256  # open connections at once (more: 503 at once)
    ui: bool = True  # the playground at / (rank1_local.server.playground); --no-ui: / is 404

    def __post_init__(self) -> None:
        for name in ("max_documents", "max_total_chars", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise Rank1Error(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise Rank1Error(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if not self.read_timeout > 0:
            raise Rank1Error(f"read_timeout must be more than 0 seconds, got {self.read_timeout}")
        if self.api_key is not None:
            check_api_key(self.api_key)


@dataclass
class ServerState:
    """What the handlers share: the model, the HTTP settings, responses by (route, status), the rates' window."""

    model: Reranker
    settings: ServerSettings
    http_counts: dict[tuple[str, int], int] = field(default_factory=dict)
    window: RateWindow = field(default_factory=RateWindow)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set when shutdown begins: uploads stop waiting

    @property
    def engine(self) -> ScoringEngine:
        return self.model.engine

    def sample_rates(self) -> None:
        """A point of the pairs/s and tokens/s window (when a request finishes; scrapes add one too)."""
        stats = self.engine.stats()
        self.window.add(int(stats.counters["pairs"]), stats.generated_tokens)


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _fail(exc: HttpError) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.message, exc.kind), status_code=exc.status, headers=headers or None)


OTHER_ROUTE = "other"  # the route label of every path the server does not serve


class StatusCounter:
    """Pure ASGI middleware counting responses by route and status (never touches ``receive``, so clients that
    disconnect are still noticed by the handlers). Only the server's own routes are labels; any other path a client
    sends is counted as ``other`` (a label per path would let clients write to /metrics and grow it without end)."""

    def __init__(self, app: Callable[..., Awaitable[None]], counts: dict[tuple[str, int], int],
                 routes: frozenset[str]) -> None:
        self.app, self.counts, self.routes = app, counts, routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else OTHER_ROUTE

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                key = (route, int(message["status"]))
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _summarize(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid request: " + "; ".join(parts)


CLOSE = {"Connection": "close"}


async def _read_body(request: Request, limit: int, timeout: float, stopping: asyncio.Event) -> bytes:
    """The request body, refused when it is over ``limit`` bytes (413), has not all arrived ``timeout`` seconds
    after the headers (408: a stalled upload does not hold the connection), or the server begins to shut down while
    it is still arriving (503: nothing waits for a stalled client then)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes "
                             "(--max-body-bytes)", "request_too_large", CLOSE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks = request.stream().__aiter__()
    stop = asyncio.ensure_future(stopping.wait())
    body = bytearray()
    try:
        while True:
            following = asyncio.ensure_future(chunks.__anext__())
            done, _ = await asyncio.wait({following, stop}, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if following not in done:
                following.cancel()
                if stop in done:
                    raise HttpError(503, SHUTDOWN_REASON, "shutting_down", CLOSE)
                raise HttpError(408, f"the request body did not arrive within {timeout:g} s (--read-timeout)",
                                "request_timeout", CLOSE)
            try:
                body += following.result()
            except StopAsyncIteration:
                return bytes(body)
            except ClientDisconnect:
                raise HttpError(499, "the client went away while sending the request", "client_closed") from None
            if len(body) > limit:
                raise HttpError(413, f"request body is over the limit of {limit} bytes (--max-body-bytes)",
                                "request_too_large", CLOSE)
    finally:
        stop.cancel()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _authorize(request: Request) -> None:
    key = _state(request).settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise HttpError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "unauthorized")


# --- handlers ------------------------------------------------------------------------------------------------------

async def health(request: Request) -> dict[str, Any]:
    state = _state(request)
    stats = state.engine.stats()
    return {"status": "ok", "model": state.settings.model_name, "backend": stats.backend, "slots": stats.slots,
            "active_slots": stats.active_slots, "queue_depth": stats.waiting}


async def models(request: Request) -> dict[str, Any]:
    _authorize(request)
    state = _state(request)
    model, stats = state.model, state.engine.stats()
    return {"object": "list", "data": [{
        "id": state.settings.model_name, "object": "model", "owned_by": "rank1-local",
        "created": int(stats.counters["started"]),
        "meta": {"file": model.model_path.name, "backend": stats.backend, "device": stats.device,
                 "slots": stats.slots, "protocol": model.config.to_dict(), **_cascade_meta(model)}}]}


def _cascade_meta(model: Reranker) -> dict[str, Any]:
    """A cascade's prefilter and cut, as /v1/models shows them."""
    prefilter = getattr(model, "prefilter", None)
    if prefilter is None:
        return {}
    return {"prefilter": {"file": prefilter.model_path.name, "card": prefilter.card.name,
                          "backend": prefilter.backend, "device": prefilter.device}, "keep": getattr(model, "keep")}


async def metrics(request: Request) -> PlainTextResponse:
    _authorize(request)
    state = _state(request)
    return PlainTextResponse(render(state.engine.stats(), state.window, state.http_counts),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def _parse(request: Request, state: ServerState) -> RerankRequest:
    """The request, checked against the limits (413) and validated (422) before anything is scored."""
    settings = state.settings
    body = await _read_body(request, settings.max_body_bytes, settings.read_timeout, state.stopping)
    try:
        req = RerankRequest.model_validate_json(body)
    except ValidationError as exc:
        raise HttpError(422, _summarize(exc), "invalid_request") from None
    n_docs = len(req.passages)
    if n_docs > settings.max_documents:
        raise HttpError(413, f"{n_docs} documents is over the limit of {settings.max_documents} per request "
                             "(--max-documents)", "request_too_large")
    n_chars = req.total_chars()
    if n_chars > settings.max_total_chars:
        raise HttpError(413, f"{n_chars} characters of query and documents is over the limit of "
                             f"{settings.max_total_chars} (--max-chars)", "request_too_large")
    return req


async def rerank(request: Request) -> Response:
    _authorize(request)
    state = _state(request)
    req = await _parse(request, state)
    try:
        config = req.config(state.model.config)
    except Rank1Error as exc:
        raise HttpError(422, str(exc), "invalid_request") from None
    try:  # admission, then tokenizing: off the event loop
        ticket = await run_in_threadpool(state.engine.submit, req.pairs(), config)
    except Stopped as exc:
        raise HttpError(503, str(exc), "shutting_down") from None
    except Overloaded as exc:
        raise HttpError(503, str(exc), "overloaded", {"Retry-After": f"{max(1, round(exc.retry_after))}"}) from None
    except TooLarge as exc:
        raise HttpError(413, str(exc), "request_too_large") from None
    except Rank1Error as exc:
        raise HttpError(422, str(exc), "invalid_request") from None
    if req.stream:
        return StreamingResponse(_events(state, req, ticket), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results: list[Rank1Result] = []
    async with aclosing(_results(state, ticket, POLL_S)) as items:
        async for item in items:
            if item is None:
                if await request.is_disconnected():
                    return Response(status_code=499)  # the client went away (its pairs are cancelled)
                continue
            results.append(item)
    return JSONResponse(rerank_response(req, results, state.settings.model_name))


async def _results(state: ServerState, ticket: TicketView, wait: float) -> AsyncIterator[Rank1Result | None]:
    """The ticket's results as they arrive; None after each ``wait`` seconds without one (for heartbeats and
    disconnect checks). A failure raises :class:`HttpError`; a ticket left unfinished is cancelled (by the ticket's
    own iterator, when this one is closed)."""
    try:
        async with aclosing(ticket.aresults(wait)) as items:
            async for item in items:
                yield item
    except Stopped as exc:
        raise HttpError(503, str(exc), "shutting_down") from None
    except Rank1Error as exc:
        raise HttpError(500, f"scoring failed: {exc}", "engine_error") from None
    except Exception as exc:
        raise HttpError(500, f"scoring failed: {exc}", "engine_error") from None
    state.sample_rates()


async def _events(state: ServerState, req: RerankRequest, ticket: TicketView) -> AsyncIterator[str]:
    """``event: result`` per document as it finishes (with its reasoning), then ``event: done`` with the whole
    answer; ``event: error`` if scoring fails or the server shuts down."""
    results: list[Rank1Result] = []
    started = time.perf_counter()
    try:
        async with aclosing(_results(state, ticket, HEARTBEAT_S)) as items:
            async for item in items:
                if item is None:
                    yield ": waiting\n\n"
                    continue
                results.append(item)
                row = result_row(req, item, reasoning=True) | {"seconds": round(time.perf_counter() - started, 3)}
                yield _sse("result", row)
    except HttpError as exc:
        yield _sse("error", error_body(exc.message, exc.kind))
        return
    yield _sse("done", rerank_response(req, results, state.settings.model_name))


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _http_error(_: Request, exc: HttpError) -> JSONResponse:
    return _fail(exc)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    stats = state.engine.stats()
    logger.info("serving %s on %s, %s (%d slots)", state.settings.model_name, stats.backend, stats.device,
                stats.slots)
    yield
    report = await run_in_threadpool(state.engine.stop, 0.0, SHUTDOWN_REASON)
    if report.in_flight:
        logger.info("shut down: of %d request%s in flight, %d finished and %d %s cancelled (%d pairs not scored)",
                    report.in_flight, "" if report.in_flight == 1 else "s", report.finished_requests,
                    report.cancelled_requests, "was" if report.cancelled_requests == 1 else "were",
                    report.cancelled_pairs)
    else:
        logger.info("shut down: no request was in flight")


def create_app(model: Reranker, settings: ServerSettings) -> Any:
    """The ASGI app serving ``model`` (loaded; it is closed by its owner, after the server has stopped)."""
    app = FastAPI(title="rank1-local", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.server = state = ServerState(model, settings)
    app.add_exception_handler(HttpError, _http_error)  # type: ignore[arg-type]
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    for route in RERANK_ROUTES:
        app.add_api_route(route, rerank, methods=["POST"])
    if settings.ui:
        add_playground(app)
    routes = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    wrapped = StatusCounter(app, state.http_counts, routes)
    wrapped.server = state  # type: ignore[attr-defined]
    return wrapped
