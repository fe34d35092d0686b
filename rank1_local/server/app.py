"""The HTTP server's ASGI application (FastAPI): rerank endpoints, health, models and metrics.

Every request's pairs go to the one :class:`BatchService`; the handler waits for its results (or streams them as
server-sent events) and cancels its pairs when the client goes away. Bad input is answered with a clear message
(401 auth, 413 over a limit, 422 invalid) and never reaches the batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from rank1_local.version import __version__
from rank1_local.backends.llama.service import BatchService, ServiceStopped, Ticket
from rank1_local.core.errors import Rank1Error
from rank1_local.core.results import Rank1Result
from rank1_local.server.metrics import RateWindow, render
from rank1_local.server.schema import RerankRequest, error_body, rerank_response, result_row

logger = logging.getLogger(__name__)

RERANK_ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")
HEARTBEAT_S = 1.0  # an SSE comment while no result is ready (keeps proxies open, notices closed clients)
POLL_S = 0.25  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class ServerSettings:
    """Settings of the HTTP layer (the model's settings are the service's)."""

    model_name: str
    api_key: str | None = None
    max_documents: int = 1000
    max_total_chars: int = 2_000_000
    max_body_bytes: int = 16 * 1024 * 1024
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_documents", "max_total_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise Rank1Error(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise Rank1Error(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _fail(status: int, message: str, kind: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


class StatusCounter:
    """Pure ASGI middleware counting responses by route and status (never touches ``receive``, so clients that
    disconnect are still noticed by the handlers)."""

    def __init__(self, app: Callable[..., Awaitable[None]], counts: dict[tuple[str, int], int]) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                key = (scope["path"], int(message["status"]))
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _summarize(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "invalid request: " + "; ".join(parts)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes "
                             "(--max-body-bytes)", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"request body is over the limit of {limit} bytes (--max-body-bytes)",
                            "request_too_large")
    return bytes(body)


def create_app(service: BatchService, settings: ServerSettings) -> Any:
    """The ASGI app serving ``service``. The service is started and stopped with the app's lifespan."""
    http_counts: dict[tuple[str, int], int] = {}
    window = RateWindow()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        logger.info("serving %s (%d slots)", settings.model_name, service.slots)
        yield
        report = await run_in_threadpool(service.stop, 0.0)
        if report.in_flight:
            logger.info("shut down: of %d requests in flight, %d finished and %d were cancelled (%d pairs not scored)",
                        report.in_flight, report.finished_requests, report.cancelled_requests, report.cancelled_pairs)
        else:
            logger.info("shut down: no request was in flight")

    app = FastAPI(title="rank1-local", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise HttpError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "unauthorized")

    @app.exception_handler(HttpError)
    async def _http_error(_: Request, exc: HttpError) -> JSONResponse:
        return _fail(exc.status, exc.message, exc.kind)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "slots": service.slots,
                "active_slots": service.active_slots, "queue_depth": service.queue_depth}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        model = service.model
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "owned_by": "rank1-local",
            "created": int(service.counters.started),
            "meta": {"file": model.model_path.name, "backend": model.backend, "slots": service.slots,
                     "protocol": model.config.to_dict()}}]}

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(render(service, window, http_counts),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def rerank(request: Request) -> Response:
        authorize(request)
        body = await _read_body(request, settings.max_body_bytes)
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
        try:
            config = req.config(service.model.config)
        except Rank1Error as exc:
            raise HttpError(422, str(exc), "invalid_request") from None

        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Rank1Result | BaseException] = asyncio.Queue()

        def post(item: Rank1Result | BaseException) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        try:
            ticket = await run_in_threadpool(service.submit, req.pairs(), config, post, post)
        except ServiceStopped as exc:
            raise HttpError(503, str(exc), "shutting_down") from None
        except Rank1Error as exc:
            raise HttpError(422, str(exc), "invalid_request") from None
        if req.stream:
            return StreamingResponse(_events(req, ticket, inbox), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await _collect(request, ticket, inbox)
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(rerank_response(req, results, settings.model_name))

    def sample_rates() -> None:
        """A point of the pairs/s and tokens/s window when a request finishes (scrapes add one too)."""
        window.add(service.counters.pairs, service.counters.generated_tokens)

    async def _collect(request: Request, ticket: Ticket,
                       inbox: asyncio.Queue[Rank1Result | BaseException]) -> list[Rank1Result] | None:
        results: list[Rank1Result] = []
        try:
            while len(results) < ticket.size:
                try:
                    item = await asyncio.wait_for(inbox.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if isinstance(item, ServiceStopped):
                    raise HttpError(503, str(item), "shutting_down")
                if isinstance(item, BaseException):
                    raise HttpError(500, f"scoring failed: {item}", "engine_error")
                results.append(item)
            sample_rates()
            return results
        finally:
            if len(results) < ticket.size:
                service.cancel(ticket)

    async def _events(req: RerankRequest, ticket: Ticket,
                      inbox: asyncio.Queue[Rank1Result | BaseException]) -> AsyncIterator[str]:
        """``event: result`` per document as it finishes (with its reasoning), then ``event: done`` with the whole
        answer; ``event: error`` if scoring fails."""
        results: list[Rank1Result] = []
        started = time.perf_counter()
        try:
            while len(results) < ticket.size:
                try:
                    item = await asyncio.wait_for(inbox.get(), timeout=HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"
                    continue
                if isinstance(item, ServiceStopped):
                    yield _sse("error", error_body(str(item), "shutting_down"))
                    return
                if isinstance(item, BaseException):
                    yield _sse("error", error_body(f"scoring failed: {item}", "engine_error"))
                    return
                results.append(item)
                row = result_row(req, item, reasoning=True) | {"seconds": round(time.perf_counter() - started, 3)}
                yield _sse("result", row)
            sample_rates()
            yield _sse("done", rerank_response(req, results, settings.model_name))
        finally:
            if len(results) < ticket.size:
                service.cancel(ticket)

    for route in RERANK_ROUTES:
        app.add_api_route(route, rerank, methods=["POST"], include_in_schema=True)
    return StatusCounter(app, http_counts)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
