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

from rank1_local.backends.llama.facade import Rank1
from rank1_local.core.errors import Rank1Error
from rank1_local.server.app import SHUTDOWN_REASON, ServerSettings, create_app

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"retry-after: 1\r\ncontent-length: 66\r\n\r\n"
        b'{"message":"too many open connections","error_type":"overloaded"}\n')

logger = logging.getLogger(__name__)

API_KEY_ENV = "RANK1_LOCAL_API_KEY"


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
    """uvicorn's h11 protocol with a deadline for a new connection's first request headers (uvicorn's keep-alive
    timer, armed at once instead of after a first response) and a cap on open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                logger.warning("%d connections are open, the limit is %d (--max-connections): refusing one",
                               len(self.connections) - 1, max_connections)
                transport.write(BUSY)
                transport.close()
                return
            # cancelled by uvicorn when the request's headers are complete; if they are not by then, closed
            self.timeout_keep_alive_task = self.loop.call_later(read_timeout, self.timeout_keep_alive_handler)

    assert len(BUSY.split(b"\r\n\r\n", 1)[1]) == 66
    return GuardedH11Protocol


def serve(model: Rank1, settings: ServerSettings, *, host: str, port: int) -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM: requests in flight get ``settings.shutdown_timeout``
    seconds to finish, then are cancelled; the log says which)."""
    import uvicorn

    app = create_app(model, settings)
    pipeline = model.pipeline
    stopping = app.server.stopping

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            pipeline.drain()
            stopping.set()  # uploads still arriving are answered 503 now: nothing waits for a stalled client
            open_requests = pipeline.open_tickets
            logger.info("shutting down: %d request%s in flight (%d pairs waiting), up to %g s to finish",
                        open_requests, "" if open_requests == 1 else "s", model.waiting, settings.shutdown_timeout)

            async def deadline() -> None:  # then each request still open is answered that it was cut short
                await asyncio.sleep(settings.shutdown_timeout)
                pipeline.abort(SHUTDOWN_REASON)

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
