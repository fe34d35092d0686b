"""Start the server: check the address and key, then run the app under uvicorn with a graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from rank1_local.backends.llama.facade import Rank1
from rank1_local.core.errors import Rank1Error
from rank1_local.server.app import SHUTDOWN_REASON, ServerSettings, create_app

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


def serve(model: Rank1, settings: ServerSettings, *, host: str, port: int) -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM: requests in flight get ``settings.shutdown_timeout``
    seconds to finish, then are cancelled; the log says which)."""
    import uvicorn

    app = create_app(model, settings)
    pipeline = model.pipeline

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            pipeline.drain()
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
                            timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5)
    logger.info("rank1-local serving %s on http://%s:%d (POST /v1/rerank)%s", settings.model_name, host, port,
                "" if settings.api_key else ", no API key")
    Server(config).run()
