"""One writer per run file: an exclusive lock held for the whole run.

Two runs appending to one ``--output`` would each score every pair and double its rows. A run takes an exclusive
``flock`` on ``OUT.lock`` (its PID written inside) before it reads what the file holds, and keeps it until it has
written its last row and header; a second run finds the lock taken and stops at once, naming the holder's PID. The
lock is the kernel's: a run that is killed (even by SIGKILL) drops it, so a stale ``OUT.lock`` never blocks a later
run. The file is removed when the holder ends normally.
"""

from __future__ import annotations

import os
from pathlib import Path

from rank1_local.core.errors import Rank1Error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    """An exclusive lock on ``output`` for this process (a context manager; :meth:`release` ends it early)."""

    def __init__(self, output: Path) -> None:
        self.path = lock_path(output)
        self._fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows: exclusive creation (a crash leaves it: the message says so)
            try:
                self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise Rank1Error(f"{output} is being written by another run ({self._holder()}); wait for it to end, "
                                 f"or delete {self.path.name} if no run is writing it") from None
            os.write(self._fd, f"{os.getpid()}\n".encode())
            return
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Rank1Error(f"{output} is being written by another run ({self._holder()}); wait for it to end, "
                                 "or write to another --output") from None
            # the holder before us may have removed the file between our open and our lock: lock the one on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _holder(self) -> str:
        try:
            pid = self.path.read_text(encoding="utf-8").strip()
        except OSError:
            pid = ""
        return f"PID {pid}" if pid.isdigit() else "its PID is not recorded"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting run then locks a new file
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
