"""The judgment cache: rank1 results remembered in SQLite, keyed by (model file, protocol settings, prompt).

Decoding is greedy, so the GGUF file, the settings that decide the numerics and the full prompt text determine
the whole result (reasoning, token count, forced answer, score): a stored result is reused exactly, not
approximately. The key is ``sha256(model digest, canonical settings JSON, prompt)``; the model digest is the
file's SHA-256 (:func:`rank1_local.models.file_digest.file_digest`, remembered by path, size and mtime).

One file is shared by the API, the CLI and the server, and by several processes at once (WAL journal, busy
timeout). The cache never fails a request: a file that is corrupt, not a database, read-only or locked past the
timeout is reported in one warning and scoring continues without it (a locked file skips the cache for that call
only). Nothing here deletes or rewrites a file it cannot read; :meth:`JudgmentCache.clear` with ``force=True``
replaces one only when asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from rank1_local.core.errors import Rank1Error
from rank1_local.models.file_digest import file_digest
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result, build_result
from rank1_local.runs.user_dirs import default_cache_path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
KEY_DOMAIN = b"rank1-local judgment v1\x00"
_CHUNK = 500  # keys per SELECT (SQLite's host-parameter limit is 999 on old builds)
_FLUSH_HITS = 256  # pending hit counts written at the latest after this many distinct keys

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

_T = TypeVar("_T")

Score = Callable[[list[PreparedPair], Callable[[Rank1Result], None] | None], list[Rank1Result]]


class CacheFileError(Rank1Error):
    """The judgment cache file cannot be used (``rank1-local cache stats|clear`` report it)."""


class CacheUnusableError(CacheFileError):
    """The file is not a judgment cache this version can use (corrupt, not SQLite, another schema …)."""


class _Unusable(Exception):
    """The file exists but is not a judgment cache this version can use (not SQLite, another schema …)."""


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (code in (5, 6) or "locked" in str(exc))


@contextmanager
def _writing(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock at once (no deferred upgrade, which SQLite's busy handler
    cannot wait for); committed when the block ends, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def canonical_settings(settings: Mapping[str, Any]) -> str:
    """The settings as canonical JSON (sorted keys, no spaces): equal settings give equal text."""
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


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


class JudgmentCache:
    """A SQLite file of rank1 judgments, safe for several threads and processes.

    Args:
        path: the SQLite file (created with its folder on first use); None: the user cache directory's
            (:func:`rank1_local.runs.user_dirs.default_cache_path`).
        timeout: seconds a call waits for another process's write lock before skipping the cache.
    """

    def __init__(self, path: str | Path | None = None, *, timeout: float = 5.0) -> None:
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self.timeout = timeout
        self.hits = 0  # over all scopes of this object
        self.misses = 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._disabled: str | None = None  # why the cache is off for this object
        self._warned_busy = False
        self._read_only = False  # writing failed as read-only: lookups go on, stores are skipped
        self._pending_hits: dict[str, int] = {}

    # -- connection ----------------------------------------------------------------------------------------------

    def _open(self, *, create: bool) -> sqlite3.Connection:
        """A connection to a judgment cache at ``self.path`` (raises :class:`_Unusable`, sqlite3.Error, OSError).
        A file that is not SQLite, or a SQLite database of something else, is refused before any write."""
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"{self.path} does not exist")
            self._create_file()
        if self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise _Unusable("the file is not a SQLite database")
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "rank1_meta" not in tables:
                raise _Unusable("the file is a SQLite database but not a rank1-local judgment cache")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # a file made by an older tool or by hand
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if {"rank1_meta", "judgments"} <= tables:  # no write needed (the file may be read-only)
                version = self._schema_version(conn)
            else:  # an empty file (left by a crash): the schema is written in place
                with _writing(conn):
                    self._write_schema(conn)
                    version = self._schema_version(conn)
            if version != str(SCHEMA_VERSION):
                raise _Unusable(f"it has schema version {version}; this rank1-local reads version {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_file(self) -> None:
        """Create the cache file whole: the schema is written to a private file in WAL mode, which is then linked
        into place (only one of several processes starting at once wins; the others open the winner's file).
        Processes never race to switch a fresh file's journal mode or to write its schema."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        files = [tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")]
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                with _writing(conn):
                    self._write_schema(conn)
            finally:
                conn.close()  # the last connection checkpoints: the whole database is in ``tmp`` now
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # another process created it first
            except OSError:  # no hard links on this file system: create it in place instead
                logger.debug("cannot link %s into place; the judgment cache is created in place", tmp)
                with open(self.path, "ab"):
                    pass
        finally:
            for f in files:
                f.unlink(missing_ok=True)

    @staticmethod
    def _write_schema(conn: sqlite3.Connection) -> None:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO rank1_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT value FROM rank1_meta WHERE name = 'schema_version'").fetchone()
        return row[0] if row else None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid != os.getpid():  # forked: the parent's connection is not ours
            self._conn, self._pending_hits = None, {}
        if self._conn is None:
            self._conn = self._open(create=True)
            self._pid = os.getpid()
        return self._conn

    def _trouble(self, exc: BaseException, action: str, waited: float = 0.0) -> None:
        """Log what went wrong (once per object) and switch the cache off unless the file was only busy."""
        if _is_busy(exc):
            message = (f"judgment cache {self.path} is locked by another process (waited {waited:.1f} s of "
                       f"{self.timeout:g} s: {exc}); {action}")
            logger.log(logging.DEBUG if self._warned_busy else logging.WARNING, message)
            self._warned_busy = True
            return
        read_only = getattr(exc, "sqlite_errorcode", None) == 8 or "readonly" in str(exc)  # SQLITE_READONLY
        if read_only and self._conn is not None:
            if not self._read_only:
                logger.warning("judgment cache %s is read-only (%s): judgments are read from it, new ones are not "
                               "kept", self.path, exc)
            self._read_only, self._pending_hits = True, {}
            return
        self._disabled = str(exc) or type(exc).__name__
        logger.warning("judgment cache %s cannot be used (%s); scoring continues without the cache. The file is "
                       "left as it is: fix or remove it, or replace it with `rank1-local cache clear --cache %s "
                       "--force`", self.path, self._disabled, self.path)
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _attempt(self, action: str, work: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        """``work(connection)`` under the lock, or ``default`` when the cache is off or fails (one warning).

        SQLite's busy handler waits while another process writes, but not in the moments when another process
        creates, recovers or closes the file's last connection: a busy file is tried again, with backoff, until
        ``timeout`` seconds have passed since the call began."""
        start, delay = time.monotonic(), 0.002
        while True:
            with self._lock:
                if self._disabled is not None:
                    return default
                try:
                    return work(self._connection())
                except (sqlite3.Error, OSError, _Unusable) as exc:
                    waited = time.monotonic() - start
                    if not (_is_busy(exc) and waited + delay < self.timeout):
                        self._trouble(exc, action, waited)
                        return default
            time.sleep(delay)
            delay = min(2 * delay, 0.1)

    @property
    def enabled(self) -> bool:
        """False once the file proved unusable (corrupt, not a database, cannot be created …): every lookup then
        misses. A read-only file stays enabled (it is read; new judgments are not kept)."""
        return self._disabled is None

    # -- requests ------------------------------------------------------------------------------------------------

    def scope(self, model_path: str | Path, settings: Mapping[str, Any]) -> CacheScope:
        """Lookups and stores for one model file under one set of protocol settings."""
        model_path = Path(model_path)
        try:
            digest = file_digest(model_path)  # remembered by path, size and mtime
        except OSError as exc:
            logger.warning("cannot hash the model file %s for the judgment cache (%s); its pairs are scored "
                           "without the cache", model_path, exc)
            return CacheScope(self, "", canonical_settings(settings), enabled=False)
        return CacheScope(self, digest, canonical_settings(settings))

    def _get(self, keys: list[str]) -> dict[str, tuple[float, str, int, bool]]:
        def select(conn: sqlite3.Connection) -> dict[str, tuple[float, str, int, bool]]:
            found: dict[str, tuple[float, str, int, bool]] = {}
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                rows = conn.execute("SELECT key, score, reasoning, n_tokens, forced FROM judgments WHERE key IN "
                                    f"({', '.join('?' * len(chunk))})", chunk).fetchall()
                for key, score, reasoning, n_tokens, forced in rows:
                    found[key] = (float(score), reasoning, int(n_tokens), bool(forced))
            if not self._read_only:
                for key in found:
                    self._pending_hits[key] = self._pending_hits.get(key, 0) + 1
                if len(self._pending_hits) >= _FLUSH_HITS:
                    try:
                        self._flush_hits(conn)
                    except sqlite3.Error as exc:  # the lookup itself succeeded: its rows are returned
                        if _is_busy(exc):  # the counts wait for the next write
                            logger.debug("judgment cache %s: hit counts not written yet (%s)", self.path, exc)
                        else:  # read-only: counting stops; broken: the cache is switched off
                            self._trouble(exc, "hit counts are not written")
            return found

        return self._attempt("this lookup is skipped (its pairs are scored)", select, {})

    def _put(self, key: str, model: str, result: Rank1Result) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            if self._read_only:
                return
            with _writing(conn):
                conn.execute("INSERT INTO judgments (key, model, score, reasoning, n_tokens, forced, created) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                             (key, model, result.score, result.reasoning, result.n_tokens, int(result.forced),
                              time.time()))
                self._write_hits(conn)
            self._pending_hits = {}

        self._attempt("this result is not stored", insert, None)

    def _write_hits(self, conn: sqlite3.Connection) -> None:
        """Write the pending hit counts inside the caller's transaction."""
        if self._pending_hits:
            now = time.time()
            conn.executemany("UPDATE judgments SET hits = hits + ?, last_used = ? WHERE key = ?",
                             [(n, now, key) for key, n in self._pending_hits.items()])

    def _flush_hits(self, conn: sqlite3.Connection) -> None:
        """Write the hit counts gathered since the last flush in a transaction of their own (lookups stay
        read-only: a hit costs one SELECT). Counts that could not be written stay pending."""
        if not self._pending_hits:
            return
        with _writing(conn):
            self._write_hits(conn)
        self._pending_hits = {}

    def close(self) -> None:
        """Write pending hit counts and close the connection (a later call opens it again)."""
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                self._conn = None
                return
            try:
                self._flush_hits(self._conn)
            except sqlite3.Error as exc:
                logger.debug("judgment cache %s: hit counts not written (%s)", self.path, exc)
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def __enter__(self) -> JudgmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- administration (``rank1-local cache``): these raise CacheFileError ----------------------------------------

    def _admin(self, create: bool = False) -> sqlite3.Connection:
        try:
            return self._open(create=create)
        except (_Unusable, sqlite3.Error) as exc:
            raise self._admin_error(exc) from None
        except OSError as exc:
            raise CacheFileError(f"cannot open the judgment cache {self.path}: {exc}") from None

    def _admin_error(self, exc: BaseException) -> CacheFileError:
        if _is_busy(exc):
            return CacheFileError(f"{self.path} is locked by another process (waited {self.timeout:g} s); try again")
        return CacheUnusableError(f"{self.path} cannot be used as a judgment cache: {exc}. `rank1-local cache clear "
                                  f"--cache {self.path} --force` replaces it with an empty cache")

    def _files(self) -> list[Path]:
        return [self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")]

    def stats(self) -> CacheStats:
        """What the file holds (a missing file is an empty cache; it is not created)."""
        if not self.path.exists():
            return CacheStats(str(self.path), False, 0, 0, 0, None, None, 0)
        self.close()  # write our pending hit counts first
        conn = self._admin()
        try:
            rows, oldest, newest, hits = conn.execute(
                "SELECT count(*), min(created), max(created), coalesce(sum(hits), 0) FROM judgments").fetchone()
            per_model = dict(conn.execute("SELECT model, count(*) FROM judgments GROUP BY model ORDER BY 2 DESC"))
        except sqlite3.Error as exc:
            raise self._admin_error(exc) from None
        finally:
            conn.close()
        size = sum(p.stat().st_size for p in self._files()[:2] if p.exists())
        return CacheStats(str(self.path), True, size, rows, len(per_model), _iso(oldest), _iso(newest), hits,
                          per_model)

    def clear(self, model: str | None = None, *, force: bool = False) -> int:
        """Remove every judgment (or those of one model digest); returns how many. With ``force``, a file that
        cannot be used as a judgment cache is replaced by an empty one (its rows are not counted)."""
        self.close()
        if not self.path.exists():
            return 0
        try:
            conn = self._admin()
            try:
                where, args = ("WHERE model = ?", (model,)) if model is not None else ("", ())
                removed = conn.execute(f"DELETE FROM judgments {where}", args).rowcount
                conn.execute("VACUUM")
                return removed
            except sqlite3.Error as exc:
                raise self._admin_error(exc) from None
            finally:
                conn.close()
        except CacheUnusableError:
            if not force:
                raise
        logger.warning("replacing %s, which is not a usable judgment cache, with an empty one", self.path)
        for p in self._files():
            p.unlink(missing_ok=True)
        self._admin(create=True).close()
        with self._lock:
            self._disabled = None
        return 0


class CacheScope:
    """Lookups and stores of one model file under one set of settings. ``hits`` / ``misses`` count pairs."""

    def __init__(self, cache: JudgmentCache, model_digest: str, settings_json: str, *, enabled: bool = True) -> None:
        self.cache = cache
        self.enabled = enabled  # False when the model file could not be hashed: every lookup misses
        self.model_digest = model_digest
        self.settings_json = settings_json
        self.hits = 0
        self.misses = 0
        self._prefix = hashlib.sha256(KEY_DOMAIN + model_digest.encode() + b"\x00" + settings_json.encode() + b"\x00")

    def key(self, prompt: str) -> str:
        """The cache key of a full prompt text under this scope."""
        h = self._prefix.copy()
        h.update(prompt.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def lookup(self, pairs: Sequence[PreparedPair]) -> dict[int, Rank1Result]:
        """Stored results of ``pairs`` by pair index (``cached=True``; ``seconds`` = the lookup's time). Pairs too
        long for the context are never looked up (they are not run). Never raises."""
        start = time.perf_counter()
        wanted = [(p, self.key(p.prompt)) for p in pairs if not p.too_long]
        if not wanted:
            return {}
        found = self.cache._get(list(dict.fromkeys(k for _, k in wanted))) if self.enabled else {}
        seconds = time.perf_counter() - start
        out = {}
        for pair, key in wanted:
            row = found.get(key)
            if row is not None:
                score, reasoning, n_tokens, forced = row
                out[pair.index] = build_result(pair, score=score, reasoning=reasoning, n_tokens=n_tokens,
                                               forced=forced, seconds=seconds, cached=True)
        with self.cache._lock:
            self.hits += len(out)
            self.misses += len(wanted) - len(out)
            self.cache.hits += len(out)
            self.cache.misses += len(wanted) - len(out)
        return out

    def store(self, pair: PreparedPair, result: Rank1Result) -> None:
        """Remember ``result`` of ``pair`` (not a too-long pair's, nor a cached one's, nor a non-finite score).
        Never raises."""
        if not self.enabled or pair.too_long or result.too_long or result.cached or not math.isfinite(result.score):
            return
        self.cache._put(self.key(pair.prompt), self.model_digest, result)


def score_with_cache(prepared: list[PreparedPair], scope: CacheScope | None, score: Score,
                     on_result: Callable[[Rank1Result], None] | None = None) -> list[Rank1Result]:
    """Score ``prepared`` through the cache: stored results are reused, ``score(misses, on_done)`` runs only the
    misses and each of its results is stored as it finishes. ``on_result`` sees every result (hits first), and the
    results come back in input order. Without a scope this is just ``score(prepared, on_result)``."""
    if scope is None:
        return score(prepared, on_result)
    by_index = scope.lookup(prepared)
    if by_index:
        logger.info("judgment cache: %d of %d pairs already judged", len(by_index), len(prepared))
    if on_result is not None:
        for index in sorted(by_index):
            on_result(by_index[index])
    misses = [p for p in prepared if p.index not in by_index]
    if misses:
        pending = {p.index: p for p in misses}

        def done(result: Rank1Result) -> None:
            pair = pending.pop(result.index, None)
            if pair is None:
                return
            by_index[result.index] = result
            scope.store(pair, result)
            if on_result is not None:
                on_result(result)

        for result in score(misses, done):
            done(result)  # a scorer that did not report it as it finished
            by_index[result.index] = result
    return [by_index[p.index] for p in prepared if p.index in by_index]
