"""Where rank1-local keeps its own files: ``$RANK1_LOCAL_HOME``, else ``$XDG_CACHE_HOME/rank1-local``, else
``~/.cache/rank1-local`` (the judgment cache, file digests, pulled bundles)."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    env = os.environ.get("RANK1_LOCAL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rank1-local"


def default_cache_path() -> Path:
    """The judgment cache's default SQLite file."""
    return home_dir() / "judgments.sqlite3"


def default_bundles_dir() -> Path:
    """Where ``rank1-local pull`` writes bundles unless told ``--out``."""
    return home_dir() / "bundles"


def digest_memo_path() -> Path:
    return home_dir() / "file-digests.json"
