"""The playground: a web page at ``/`` to try the served model in a browser (``rank1-local serve --no-ui`` leaves it
out, and ``/`` is then 404).

Three static files shipped in the package (``rank1_local/server/static/``), read once when the app is made:
the page, its script and its style. The page uses only the server's own API (``GET /v1/models`` for what is served,
``POST /v1/rerank`` with ``"stream": true`` for the results as they finish), so it needs no key of its own: with
``--api-key`` the user types the key into the page, which keeps it in memory and sends it as the Authorization header.
Its Content-Security-Policy lets it load and connect to nothing but this server.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi.responses import Response

FILES = {  # route -> (file, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_playground(app: Any) -> None:
    """Serve the playground's files on ``app`` (GET only, no key needed: they hold nothing but the page)."""
    folder = resources.files("rank1_local.server") / "static"
    for route, (name, media_type) in FILES.items():
        app.add_api_route(route, _serve((folder / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)


def _serve(body: bytes, media_type: str) -> Any:
    async def page() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return page
