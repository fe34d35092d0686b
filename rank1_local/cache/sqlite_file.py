"""The judgment cache's SQLite file itself: its schema, opening it (or creating it whole), reading it when its folder
cannot be written, write transactions, and telling its errors apart. Nothing here knows the cache's front
(:class:`~rank1_local.cache.store.JudgmentCache`); the front, its writer thread and its administration all build on
this module, and none of them on each other but through the front."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error

logger = logging.getLogger("rank1_local.cache.store")

SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rank1_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS judgments (
        key TEXT PRIMARY KEY,        -- sha256(model digest, settings JSON, prompt), hex
        model TEXT NOT NULL,         -- sha256 of the GGUF file, hex
        score REAL NOT NULL,
        reasoning TEXT NOT NULL,
        n_tokens INTEGER NOT NULL,
        forced INTEGER NOT NULL,
        created REAL NOT NULL,       -- unix time
        last_used REAL,
        hits INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS judgments_model ON judgments (model)",
)

Row = tuple[float, str, int, bool]  # score, reasoning, n_tokens, forced


class CacheFileError(Rank1Error):
    """The judgment cache file cannot be used (``rank1-local cache stats|clear`` report it)."""


class CacheUnusableError(CacheFileError):
    """The file is not a judgment cache this version can use (corrupt, not SQLite, another program's, another
    schema)."""


def is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (code in (5, 6) or "locked" in str(exc))


def is_read_only(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == 8 or "readonly" in str(exc)  # SQLITE_READONLY


@contextmanager
def writing(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock at once (no deferred upgrade, which SQLite's busy handler
    cannot wait for); committed when the block ends, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, None when there is none: tells a deleted or replaced file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def connect(path: Path, *, create: bool, timeout: float) -> sqlite3.Connection:
    """A connection to a judgment cache at ``path``. Raises :class:`CacheUnusableError` (checked before anything
    is written: a file this version refuses is left exactly as it was), ``sqlite3.Error`` or ``OSError``."""
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"{path} does not exist")
        create_file(path)
    if path.stat().st_size > 0:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise CacheUnusableError("the file is not a SQLite database")
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "rank1_meta" not in tables:
            raise CacheUnusableError("the file is a SQLite database but not a rank1-local judgment cache")
        if "rank1_meta" in tables:  # read the version before anything is written
            version = schema_version(conn)
            if version != str(SCHEMA_VERSION):
                raise CacheUnusableError(f"it has schema version {version}; this rank1-local reads version "
                                         f"{SCHEMA_VERSION}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # a file made by an older tool or by hand
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if not {"rank1_meta", "judgments"} <= tables:  # an empty file (left by a crash): the schema in place
            with writing(conn):
                write_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def create_file(path: Path) -> None:
    """Create the cache file whole: the schema is written to a private file in WAL mode, which is then linked
    into place (only one of several processes starting at once wins; the others open the winner's file).
    Processes never race to switch a fresh file's journal mode or to write its schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    files = [tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")]
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            with writing(conn):
                write_schema(conn)
        finally:
            conn.close()  # the last connection checkpoints: the whole database is in ``tmp`` now
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first
        except OSError:  # no hard links on this file system: create it in place instead
            logger.debug("cannot link %s into place; the judgment cache is created in place", tmp)
            with open(path, "ab"):
                pass
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def connect_immutable(path: Path) -> sqlite3.Connection:
    """A read-only connection to a cache whose folder cannot be written: SQLite cannot make the journal's shared
    memory file there, so the file is opened as immutable (no locks, no journal), the one way to read it."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None,
                           check_same_thread=False)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"rank1_meta", "judgments"} <= tables:
            raise CacheUnusableError("the file is not a rank1-local judgment cache")
        version = schema_version(conn)
        if version != str(SCHEMA_VERSION):
            raise CacheUnusableError(f"it has schema version {version}; this rank1-local reads version "
                                     f"{SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


def valid_row(score: Any, reasoning: Any, n_tokens: Any, forced: Any) -> bool:
    """Whether a stored judgment reads back as one (a row edited or damaged outside rank1-local is a miss, and is
    replaced by the next judgment of its pair: :data:`VALID_ROW_SQL` says the same in SQL)."""
    return isinstance(score, float) and 0.0 <= score <= 1.0 and isinstance(reasoning, str) and \
        isinstance(n_tokens, int) and n_tokens >= 0 and forced in (0, 1)


VALID_ROW_SQL = ("typeof(judgments.score) = 'real' AND judgments.score BETWEEN 0 AND 1 AND "
                 "typeof(judgments.reasoning) = 'text' AND typeof(judgments.n_tokens) = 'integer' AND "
                 "judgments.n_tokens >= 0 AND judgments.forced IN (0, 1)")


def write_schema(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT OR IGNORE INTO rank1_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def schema_version(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM rank1_meta WHERE name = 'schema_version'").fetchone()
    return row[0] if row else None


def close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass
