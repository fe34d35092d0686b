"""The judgment cache's front: :class:`JudgmentCache` over its SQLite file (:mod:`rank1_local.cache.sqlite_file`), its
writer thread (:mod:`rank1_local.cache.writer`), its scopes (:mod:`rank1_local.cache.scope`) and its administration
(:mod:`rank1_local.cache.admin`); none of those imports this module.

One file is shared by the API, the CLI and the server, and by several processes at once (WAL journal, busy
timeout). The cache never fails a request: a file that is corrupt, not a database, of another schema, read-only or
locked past the timeout is reported in one warning and scoring continues without it (a locked file skips the cache
for that call only). Nothing here writes to, rewrites or deletes a file it cannot use; ``rank1-local cache clear
--force`` replaces one only when asked (:mod:`rank1_local.cache.admin`).

Reads happen in the caller's thread; writes go to a :class:`~rank1_local.cache.writer.CacheWriter` thread with a
connection of its own, so a busy or slow file never stalls decoding. A judgment waiting to be written is already
served to this process's lookups.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from rank1_local.cache.admin import CacheStats, cache_stats, clear_cache
from rank1_local.cache.keys import canonical_settings
from rank1_local.cache.scope import CacheScope
from rank1_local.cache.sqlite_file import (
    CacheFileError,
    CacheUnusableError,
    Row,
    close_quietly,
    connect,
    connect_immutable,
    file_identity,
    is_busy,
    is_read_only,
    valid_row,
)
from rank1_local.cache.writer import CacheWriter
from rank1_local.core.results import Rank1Result
from rank1_local.models.file_digest import file_digest
from rank1_local.runs.user_dirs import default_cache_path

__all__ = ["CacheFileError", "CacheStats", "CacheUnusableError", "JudgmentCache"]

logger = logging.getLogger(__name__)

_CHUNK = 500  # keys per SELECT (SQLite's host-parameter limit is 999 on old builds)
_T = TypeVar("_T")


class JudgmentCache:
    """A SQLite file of rank1 judgments, safe for several threads and processes.

    Args:
        path: the SQLite file (created with its folder on first use); None: the user cache directory's
            (:func:`rank1_local.runs.user_dirs.default_cache_path`).
        timeout: seconds a lookup waits for another process's lock before skipping the cache.
    """

    def __init__(self, path: str | Path | None = None, *, timeout: float = 5.0) -> None:
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self.timeout = timeout
        self.hits = 0  # over all scopes of this object
        self.misses = 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # the file the reading connection has open
        self._pid = os.getpid()
        self._disabled: str | None = None  # why the cache is off for this object
        self._warned: set[str] = set()
        self._read_only = False  # writing failed as read-only: lookups go on, stores are skipped
        self._writer: CacheWriter | None = None

    # -- connections ---------------------------------------------------------------------------------------------

    def connect(self, *, create: bool, timeout: float | None = None) -> sqlite3.Connection:
        """A connection to the file (see :func:`rank1_local.cache.sqlite_file.connect`)."""
        return connect(self.path, create=create, timeout=self.timeout if timeout is None else timeout)

    def _connection(self) -> sqlite3.Connection:
        """The reading connection (opened again after a fork, or when the file was deleted or replaced)."""
        if self._conn is not None and self._pid != os.getpid():  # forked: the parent's connection is not ours
            self._conn = None
        if self._conn is not None and file_identity(self.path) != self._identity:
            self.warn_once("replaced", "judgment cache %s was deleted or replaced while in use: opening it again "
                           "(judgments from now on are kept in the new file)", self.path)
            close_quietly(self._conn)
            self._conn = None
        if self._conn is None:
            try:
                self._conn = self.connect(create=True)
            except sqlite3.Error as exc:
                if not is_read_only(exc) or not self.path.is_file():
                    raise
                self._conn = connect_immutable(self.path)
                self.warn_once("read-only", "judgment cache %s is read-only (%s): judgments are read from it, new "
                               "ones are not kept (changes another process makes to it are seen from the next start)",
                               self.path, exc)
                self._read_only = True
            self._identity = file_identity(self.path)
            self._pid = os.getpid()
        return self._conn

    def warn_once(self, what: str, message: str, *args: Any) -> None:
        """A warning about ``what``, logged once per cache object (later ones at DEBUG)."""
        logger.log(logging.DEBUG if what in self._warned else logging.WARNING, message, *args)
        self._warned.add(what)

    def trouble(self, exc: BaseException, action: str, waited: float = 0.0) -> None:
        """Log what went wrong (once per object) and switch the cache off unless the file was only busy or is
        read-only. Call with the lock held."""
        if is_busy(exc):
            self.warn_once("busy", "judgment cache %s is locked by another process (waited %.1f s of %g s: %s); %s",
                           self.path, waited, self.timeout, exc, action)
            return
        if is_read_only(exc):
            if not self._read_only:
                self.warn_once("read-only", "judgment cache %s is read-only (%s): judgments are read from it, new "
                               "ones are not kept", self.path, exc)
            self._read_only = True
            return
        self._disabled = str(exc) or type(exc).__name__
        logger.warning("judgment cache %s cannot be used (%s); scoring continues without the cache. The file is "
                       "left as it is: fix or remove it, or replace it with `rank1-local cache clear --cache %s "
                       "--force`", self.path, self._disabled, self.path)
        if self._conn is not None:
            close_quietly(self._conn)
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
                except (sqlite3.Error, OSError, CacheUnusableError) as exc:
                    waited = time.monotonic() - start
                    if not (is_busy(exc) and waited + delay < self.timeout):
                        self.trouble(exc, action, waited)
                        return default
            time.sleep(delay)
            delay = min(2 * delay, 0.1)

    @property
    def enabled(self) -> bool:
        """False once the file proved unusable (corrupt, not a database, cannot be created …): every lookup then
        misses. A read-only file stays enabled (it is read; new judgments are not kept)."""
        return self._disabled is None

    @property
    def read_only(self) -> bool:
        return self._read_only

    # -- judgments -----------------------------------------------------------------------------------------------

    def scope(self, model_path: str | Path, settings: Mapping[str, Any]) -> CacheScope:
        """Lookups and stores for one model file under one set of protocol settings."""
        model_path = Path(model_path)
        try:
            digest = file_digest(model_path)
        except OSError as exc:
            logger.warning("cannot hash the model file %s for the judgment cache (%s); its pairs are scored "
                           "without the cache", model_path, exc)
            return CacheScope(self, "", canonical_settings(settings), model_path.name, enabled=False)
        return CacheScope(self, digest, canonical_settings(settings), model_path.name)

    def rows(self, keys: list[str]) -> dict[str, Row]:
        """The stored judgments of ``keys`` (those still waiting to be written included); their hit counts go to
        the writer. Never raises: a cache that cannot be read misses."""
        found: dict[str, Row] = {}
        if self._writer is not None:
            found.update(self._writer.pending(keys))
        wanted = [k for k in keys if k not in found]

        def select(conn: sqlite3.Connection) -> dict[str, Row]:
            out: dict[str, Row] = {}
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start:start + _CHUNK]
                rows = conn.execute("SELECT key, score, reasoning, n_tokens, forced FROM judgments WHERE key IN "
                                    f"({', '.join('?' * len(chunk))})", chunk).fetchall()
                for key, score, reasoning, n_tokens, forced in rows:
                    if valid_row(score, reasoning, n_tokens, forced):
                        out[key] = (float(score), reasoning, n_tokens, bool(forced))
                    else:
                        self.warn_once("bad-row", "judgment cache %s: a stored judgment does not read back (score %r, "
                                       "n_tokens %r): it is scored again and replaced", self.path, score, n_tokens)
            return out

        if wanted:
            found.update(self._attempt("this lookup is skipped (its pairs are scored)", select, {}))
        if found and not self._read_only and self._disabled is None:
            self.writer().count_hits(list(found))
        return found

    def put(self, key: str, model_digest: str, result: Rank1Result, model_name: str) -> None:
        """Keep a judgment (written by the writer thread, in a batch; never blocks, never raises)."""
        if self._disabled is not None or self._read_only:
            return
        self.writer().put(key, (model_digest, result.score, result.reasoning, result.n_tokens, int(result.forced),
                                time.time(), model_name))

    def writer(self) -> CacheWriter:
        with self._lock:
            if self._writer is None or not self._writer.alive_in_this_process:
                self._writer = CacheWriter(self)
            return self._writer

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every judgment and hit count given so far is written (or given up); False on timeout."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def close(self) -> None:
        """Write what is pending (waiting up to the timeout for a locked file) and close the connections; a later
        call opens them again."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close(self.timeout)
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                close_quietly(self._conn)
            self._conn = None

    def __enter__(self) -> JudgmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- administration (``rank1-local cache``): see rank1_local.cache.admin -------------------------------------

    def stats(self) -> CacheStats:
        return cache_stats(self)

    def clear(self, model: str | None = None, *, force: bool = False) -> int:
        return clear_cache(self, model, force=force)

    def enable(self) -> None:
        """Use the file again (after ``clear --force`` replaced an unusable one)."""
        with self._lock:
            self._disabled = None
