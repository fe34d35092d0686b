"""Write files so that readers only ever see a complete file (temp file + fsync + rename), and remove what a killed
writer left behind."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``, on error it is removed."""
    tmp = temp_name(target)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (another user's process, or no way to tell, counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale(folder: Path, pattern: str, what: str) -> list[Path]:
    """Remove the files and folders in ``folder`` whose name matches ``pattern`` (a regular expression with a ``pid``
    group: the process that was writing them) when that process is gone: the temporary files and staging folders of
    writers that were killed midway. Those of running processes (this one included) stay. The paths removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for left in folder.iterdir():
        match = re.fullmatch(pattern, left.name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or pid_alive(pid):
            continue
        logger.warning("removing %s, left by an interrupted %s (process %d)", left, what, pid)
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)
        removed.append(left)
    return removed
