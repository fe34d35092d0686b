"""Start the server: check the address and key, then run the app under uvicorn with a graceful shutdown.

Slow or stalled clients cannot hold the server: a connection must send a request's headers within ``read_timeout``
seconds of opening (or of its previous response) and the body within ``read_timeout`` seconds more (the app's
deadline, 408), else it is closed; at most ``max_connections`` connections are open at once (more are answered 503
and closed at once); headers are limited to h11's 16 KiB. On shutdown an upload still arriving is answered 503 at
once, so only requests already being scored are waited for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.core.reranker import Reranker
from rank1_local.server.app import SHUTDOWN_REASON, ServerSettings, create_app
from rank1_local.server.auth import API_KEY_ENV

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"retry-after: 1\r\ncontent-length: 66\r\n\r\n"
        b'{"message":"too many open connections","error_type":"overloaded"}\n')

logger = logging.getLogger(__name__)



def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_binding(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve a non-loopback address without an API key, unless told explicitly."""
    if is_loopback(host) or api_key or insecure_no_auth:
        return
    raise Rank1Error(f"refusing to serve on {host} without an API key: anyone who can reach that address could use "
                     f"the server. Give --api-key KEY (or set {API_KEY_ENV}), or --insecure-no-auth if the network "
                     "is trusted.")


def guarded_protocol(read_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers (from the moment the connection opens, or
    the previous response ends, to the end of the headers: uvicorn's own keep-alive timer stops at the first byte, so
    a client that sends part of its headers could hold a connection forever) and a cap on open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                logger.warning("%d connections are open, the limit is %d (--max-connections): refusing one",
                               len(self.connections) - 1, max_connections)
                transport.write(BUSY)
                transport.close()
                return
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._header_timer = self.loop.call_later(read_timeout, self._headers_too_late)

        def _cancel_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _headers_too_late(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.timeout_keep_alive_handler()  # closes the connection, as uvicorn closes an idle one

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting_for_headers():  # a request's headers are in: the app's body deadline takes over
                self._cancel_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._waiting_for_headers() and not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

    assert len(BUSY.split(b"\r\n\r\n", 1)[1]) == 66
    return GuardedH11Protocol


def serve(model: Reranker, settings: ServerSettings, *, host: str, port: int) -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM: requests in flight get ``settings.shutdown_timeout``
    seconds to finish, then are cancelled; the log says which)."""
    import uvicorn

    app = create_app(model, settings)
    engine = model.engine
    stopping = app.server.stopping

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            engine.drain()
            stopping.set()  # uploads still arriving are answered 503 now: nothing waits for a stalled client
            stats = engine.stats()
            logger.info("shutting down: %d request%s in flight (%d pairs waiting), up to %g s to finish",
                        stats.open_requests, "" if stats.open_requests == 1 else "s", stats.waiting,
                        settings.shutdown_timeout)

            async def deadline() -> None:  # then each request still open is answered that it was cut short
                await asyncio.sleep(settings.shutdown_timeout)
                engine.stop(0.0, SHUTDOWN_REASON)

            task = asyncio.create_task(deadline())
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

    # uvicorn's own limit is the backstop: by then every request has had its answer
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
                            http=guarded_protocol(settings.read_timeout, settings.max_connections),
                            timeout_keep_alive=settings.read_timeout,  # type: ignore[arg-type]
                            limit_concurrency=settings.max_connections + 1)
    logger.info("rank1-local serving %s on http://%s:%d (POST /v1/rerank)%s", settings.model_name, host, port,
                "" if settings.api_key else ", no API key")
    Server(config).run()
