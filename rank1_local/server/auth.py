"""The server's API key: what a key may be, shared by the server (which requires it) and its clients (which send it)."""

from __future__ import annotations

from rank1_local.core.errors import Rank1Error

API_KEY_ENV = "RANK1_LOCAL_API_KEY"  # the variable ``rank1-local serve`` and its clients read the key from


def check_api_key(key: str) -> None:
    """An API key every HTTP client can send: printable ASCII, no spaces (headers travel as ASCII; a key with other
    characters could never be sent, and so never authenticate)."""
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise Rank1Error("the API key must be printable ASCII without spaces (HTTP clients send it in a header, as "
                         "ASCII; a key with other characters could never authenticate)")
