"""The judgment cache's writer: one thread, one connection of its own, judgments written in batches.

Whoever finishes a judgment (the llama.cpp context's owner thread, mid-batch) only hands it over: :meth:`put` takes
a lock for a dictionary insert and returns. The writer commits what has gathered in one transaction; when the file
is locked by another process (``rank1-local cache clear`` running VACUUM, say) it keeps the judgments and tries
again later, with backoff, so decoding never waits for SQLite. Until they are written, judgments are served to this
process's lookups from memory.

What a crash can lose: a SIGKILL loses the judgments not yet committed (at most the last batch's worth, under a
second in normal operation), never a torn row, since each batch is one SQLite transaction. :meth:`close` (and so
``Rank1.close()`` and a server's shutdown) writes what is pending first.
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

from rank1_local.cache.sqlite_file import (
    VALID_ROW_SQL,
    CacheUnusableError,
    Row,
    file_identity,
    is_busy,
    is_read_only,
    writing,
)


class CacheFront(Protocol):
    """What the writer needs of the cache it writes for (:class:`~rank1_local.cache.store.JudgmentCache`)."""

    path: Path
    timeout: float
    _lock: threading.Lock

    def connect(self, *, create: bool, timeout: float | None = None) -> sqlite3.Connection: ...
    def warn_once(self, what: str, message: str, *args: Any) -> None: ...
    def trouble(self, exc: BaseException, action: str, waited: float = 0.0) -> None: ...

logger = logging.getLogger("rank1_local.cache.store")

BATCH_LINGER_S = 0.02  # after the first judgment of a batch, wait this long for more
BUSY_TIMEOUT_S = 0.25  # one write attempt waits this long for another process's lock, then tries again later
MAX_PENDING = 100_000  # judgments (and hit counts) kept in memory while the file stays locked; beyond, the oldest go

# model digest, score, reasoning, n_tokens, forced, created, model file name
Pending = tuple[str, float, str, int, int, float, str]


_LIVE: weakref.WeakSet[CacheWriter] = weakref.WeakSet()  # flushed when the interpreter exits


@atexit.register
def _flush_at_exit() -> None:
    for writer in list(_LIVE):
        writer.close(writer.cache.timeout)


class CacheWriter:
    def __init__(self, cache: CacheFront) -> None:
        self.cache = cache
        self._cond = threading.Condition()
        self._rows: dict[str, Pending] = {}
        self._hits: dict[str, int] = {}
        self._writing = False
        self._stopping = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="rank1-cache-writer", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def alive_in_this_process(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    # -- producers (any thread; never block on SQLite) ---------------------------------------------------------

    def put(self, key: str, row: Pending) -> None:
        with self._cond:
            if key not in self._rows and len(self._rows) >= MAX_PENDING:
                self._rows.pop(next(iter(self._rows)))
                self.cache.warn_once("overflow", "judgment cache %s: more than %d judgments wait to be written (the "
                                     "file stays locked); the oldest are dropped", self.cache.path, MAX_PENDING)
            self._rows[key] = row
            self._cond.notify_all()

    def count_hits(self, keys: list[str]) -> None:
        with self._cond:
            for key in keys:
                if key not in self._hits and len(self._hits) >= MAX_PENDING:
                    self._hits.pop(next(iter(self._hits)))  # hit counts are statistics: the oldest give way
                self._hits[key] = self._hits.get(key, 0) + 1
            self._cond.notify_all()

    def pending(self, keys: list[str]) -> dict[str, Row]:
        """Judgments of ``keys`` not written yet."""
        with self._cond:
            return {k: (row[1], row[2], row[3], bool(row[4])) for k in keys if (row := self._rows.get(k)) is not None}

    def flush(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._rows or self._hits or self._writing) and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return not (self._rows or self._hits)

    def close(self, timeout: float) -> None:
        """Write what is pending (waiting up to ``timeout`` for a locked file), then stop."""
        if not self.flush(timeout):
            with self._cond:
                lost = len(self._rows)
            if lost:
                logger.warning("judgment cache %s stayed locked: %d judgment(s) were not stored", self.cache.path,
                               lost)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, timeout))

    # -- the writer thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        identity = None
        delay = 0.01
        busy_since: float | None = None
        try:
            while True:
                with self._cond:
                    while not (self._rows or self._hits) and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not (self._rows or self._hits):
                        return
                if not self._stopping:
                    time.sleep(BATCH_LINGER_S)  # let a batch gather
                with self._cond:
                    rows, hits = dict(self._rows), dict(self._hits)
                    self._writing = True
                attempt = time.monotonic()
                try:
                    if conn is not None and file_identity(self.cache.path) != identity:
                        self.cache.warn_once("replaced", "judgment cache %s was deleted or replaced while in use: "
                                             "opening it again (judgments from now on are kept in the new file)",
                                             self.cache.path)
                        conn.close()
                        conn = None
                    if conn is None:
                        conn = self.cache.connect(create=True, timeout=BUSY_TIMEOUT_S)
                        identity = file_identity(self.cache.path)
                    _write(conn, rows, hits)
                except (sqlite3.Error, OSError, CacheUnusableError) as exc:
                    if is_busy(exc):
                        if self._stopping:  # close() waited long enough, and said what is lost
                            self._done(rows, hits, drop_all=True)
                            continue
                        busy_since = busy_since or attempt
                        if time.monotonic() - busy_since > self.cache.timeout:
                            self.cache.warn_once("busy", "judgment cache %s is locked by another process (for %.1f "
                                                 "s): new judgments wait in memory and are written once it is free",
                                                 self.cache.path, time.monotonic() - busy_since)
                        with self._cond:
                            self._writing = False
                            self._cond.notify_all()
                        time.sleep(delay)  # keep everything; try again later
                        delay = min(2 * delay, 0.5)
                        continue
                    with self.cache._lock:
                        self.cache.trouble(exc, "judgments are not stored")
                    if not is_read_only(exc) and conn is not None:
                        conn.close()
                        conn = None
                    self._done(rows, hits, drop_all=True)
                    continue
                except Exception as exc:  # anything else (a bug, memory): this batch is lost, said loudly; go on
                    logger.error("judgment cache %s: writing %d judgment(s) failed (%s: %s); they are not stored, "
                                 "and the writer goes on", self.cache.path, len(rows), type(exc).__name__, exc)
                    if conn is not None:
                        conn.close()
                        conn = None
                    self._done(rows, hits, drop_all=True)
                    continue
                delay, busy_since = 0.01, None
                self._done(rows, hits)
        finally:
            if conn is not None:
                conn.close()
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _done(self, rows: dict[str, Pending], hits: dict[str, int], drop_all: bool = False) -> None:
        with self._cond:
            if drop_all:
                self._rows.clear()
                self._hits.clear()
            else:
                for key, row in rows.items():
                    if self._rows.get(key) is row:
                        del self._rows[key]
                for key, n in hits.items():
                    left = self._hits.get(key, 0) - n
                    if left > 0:
                        self._hits[key] = left
                    else:
                        self._hits.pop(key, None)
            self._writing = False
            self._cond.notify_all()


def _write(conn: sqlite3.Connection, rows: dict[str, Pending], hits: dict[str, int]) -> None:
    """One transaction: the new judgments (a row already there is kept, unless it does not read back as a judgment:
    then it is replaced), their models' file names, and hit counts."""
    now = time.time()
    with writing(conn):
        conn.executemany("INSERT INTO judgments (key, model, score, reasoning, n_tokens, forced, created) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET model = excluded.model, score = "
                         "excluded.score, reasoning = excluded.reasoning, n_tokens = excluded.n_tokens, forced = "
                         f"excluded.forced, created = excluded.created WHERE NOT ({VALID_ROW_SQL})",
                         [(key, *row[:6]) for key, row in rows.items()])
        names = {row[0]: row[6] for row in rows.values() if row[0] and row[6]}
        conn.executemany("INSERT INTO rank1_meta VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                         [(f"model_name:{digest}", name) for digest, name in names.items()])
        conn.executemany("UPDATE judgments SET hits = hits + ?, last_used = ? WHERE key = ?",
                         [(n, now, key) for key, n in hits.items()])
