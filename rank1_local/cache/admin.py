"""``rank1-local cache stats|clear``: what a judgment cache file holds, and emptying it (or, when asked, replacing a
file that is not a usable cache)."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from rank1_local.cache.sqlite_file import CacheFileError, CacheUnusableError, is_busy


class JudgmentCache(Protocol):
    """What administration needs of the cache (:class:`~rank1_local.cache.store.JudgmentCache`)."""

    path: Path
    timeout: float

    def connect(self, *, create: bool, timeout: float | None = None) -> sqlite3.Connection: ...
    def close(self) -> None: ...
    def enable(self) -> None: ...

logger = logging.getLogger("rank1_local.cache.store")


@dataclass(frozen=True)
class CacheStats:
    path: str
    exists: bool
    size_bytes: int  # the database file plus its write-ahead log
    rows: int
    models: int  # distinct model files (GGUF digests)
    oldest: str | None  # creation time of the oldest / newest judgment, ISO 8601 UTC
    newest: str | None
    hits: int  # times judgments were served (counts are written in batches, at the latest on close)
    rows_per_model: dict[str, int] = field(default_factory=dict)  # model digest -> rows
    model_names: dict[str, str] = field(default_factory=dict)  # model digest -> the file name it was last seen as


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _error(cache: JudgmentCache, exc: BaseException) -> CacheFileError:
    if is_busy(exc):
        return CacheFileError(f"{cache.path} is locked by another process (waited {cache.timeout:g} s); try again")
    return CacheUnusableError(f"{cache.path} cannot be used as a judgment cache: {exc}. `rank1-local cache clear "
                              f"--cache {cache.path} --force` replaces it with an empty cache")


def _connect(cache: JudgmentCache, create: bool = False) -> sqlite3.Connection:
    try:
        return cache.connect(create=create)
    except (CacheUnusableError, sqlite3.Error) as exc:
        raise _error(cache, exc) from None
    except OSError as exc:
        raise CacheFileError(f"cannot open the judgment cache {cache.path}: {exc}") from None


def _files(cache: JudgmentCache) -> list:
    path = cache.path
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def cache_stats(cache: JudgmentCache) -> CacheStats:
    """What the file holds (a missing file is an empty cache; it is not created)."""
    cache.close()  # our pending judgments and hit counts first
    if not cache.path.exists():
        return CacheStats(str(cache.path), False, 0, 0, 0, None, None, 0)
    conn = _connect(cache)
    try:
        rows, oldest, newest, hits = conn.execute(
            "SELECT count(*), min(created), max(created), coalesce(sum(hits), 0) FROM judgments").fetchone()
        per_model = dict(conn.execute("SELECT model, count(*) FROM judgments GROUP BY model ORDER BY 2 DESC"))
        names = {name.removeprefix("model_name:"): value for name, value in
                 conn.execute("SELECT name, value FROM rank1_meta WHERE name LIKE 'model_name:%'")}
    except sqlite3.Error as exc:
        raise _error(cache, exc) from None
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in _files(cache)[:2] if p.exists())
    return CacheStats(str(cache.path), True, size, rows, len(per_model), _iso(oldest), _iso(newest), hits,
                      per_model, {d: names[d] for d in per_model if d in names})


def clear_cache(cache: JudgmentCache, model: str | None = None, *, force: bool = False) -> int:
    """Remove every judgment (or those of one model digest); returns how many. With ``force``, a file that cannot
    be used as a judgment cache is replaced by an empty one (its rows are not counted)."""
    cache.close()
    if not cache.path.exists():
        return 0
    try:
        conn = _connect(cache)
        try:
            where, args = ("WHERE model = ?", (model,)) if model is not None else ("", ())
            removed = conn.execute(f"DELETE FROM judgments {where}", args).rowcount
            conn.execute("VACUUM")
            return removed
        except sqlite3.Error as exc:
            raise _error(cache, exc) from None
        finally:
            conn.close()
    except CacheUnusableError:
        if not force:
            raise
    logger.warning("replacing %s, which is not a usable judgment cache, with an empty one", cache.path)
    for p in _files(cache):
        p.unlink(missing_ok=True)
    _connect(cache, create=True).close()
    cache.enable()
    return 0
