"""One run file being written: where it may go, who writes it, what it already holds, and its header first.

Every writer of run files (``rerank --pairs``, ``rerank --ray``, the reference runs, the study) opens its output
through :class:`RunOutput`, which, before anything slow starts:

- refuses an output that is not a regular file (``/dev/null``, ``/dev/stdout``, a FIFO), a ``*.header.json`` path (the
  header of another run), an input of this run, or a path whose header would overwrite an input;
- takes the output's lock (:mod:`rank1_local.runs.output_lock`): a second writer stops, naming the first one's PID;
- reads the rows already written (only complete result rows count as done) and their header (a header without rows
  describes nothing, and is replaced), and refuses rows without a header (a run killed before headers were written first: nothing says which model made them) unless told
  ``force_resume``.

Once the model is loaded, :meth:`RunOutput.begin` writes the header (atomically) before the first row, so a run killed
at any point leaves a header that the next run is checked against; :meth:`RunOutput.save_header` rewrites it as rows
are added, its ``pairs`` always the number of rows the file holds.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.runs.inputs import check_writable, done_keys
from rank1_local.runs.output_lock import OutputLock, lock_path
from rank1_local.runs.run_header import (
    HEADER_SUFFIX,
    RunHeader,
    check_resume,
    header_path,
    read_header,
    start_run,
    write_header,
)

logger = logging.getLogger(__name__)

HEADER_EVERY_S = 10.0  # while a run goes on, its header's counts are rewritten at most this often


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: Path, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output a run must not write: not a regular file, a run header, an input of the run, or one whose
    header or lock would land on an input. Nothing is written by the check."""
    if output.name.endswith(HEADER_SUFFIX):
        raise Rank1Error(f"{output}: a run header's name; --output is the run file itself (its header is written "
                         "beside it as OUT.header.json)")
    if output.name.endswith(".lock"):
        raise Rank1Error(f"{output}: a run file's lock; choose another --output")
    try:
        mode = output.stat().st_mode if output.exists() else None
    except OSError as exc:
        raise Rank1Error(f"{output}: cannot be read ({exc.strerror or exc})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise Rank1Error(f"{output}: is a folder; --output must be a file path")
    if mode is not None and not stat.S_ISREG(mode):
        raise Rank1Error(f"{output}: not a regular file (a device, pipe or socket); --output must be a file that "
                         "can be read back to resume")
    for path in inputs:
        if _same_file(output, path) or output.resolve() == path.resolve():
            raise Rank1Error(f"{output}: is an input of this run ({path}); write to another --output")
        for name, derived in (("header", header_path(output)), ("lock", lock_path(output))):
            if _same_file(derived, path) or derived.resolve() == path.resolve():
                raise Rank1Error(f"{output}: its {name} {derived.name} would overwrite the input {path}; write to "
                                 "another --output")
    check_writable(output)


class RunOutput:
    """A run file opened for this run (a context manager: the lock is held until it ends).

    Args:
        path: the run file (JSONL rows; the header is ``OUT.header.json`` beside it).
        inputs: the run's input files (refused as the output).
        force_resume: keep rows that have no header to check them against.
    """

    def __init__(self, path: Path, inputs: Sequence[Path] = (), *, force_resume: bool = False) -> None:
        check_output_path(path, inputs)
        self.path = path
        self.existed = path.exists()
        self._lock = OutputLock(path)
        try:
            self.done = done_keys(path)
            self.header: RunHeader | None = read_header(header_path(path)) if self.done else None
            if self.done and self.header is None:
                if not force_resume:
                    raise Rank1Error(
                        f"{path} holds {len(self.done)} row{'s' if len(self.done) != 1 else ''} but no header "
                        f"({header_path(path).name}: a run killed before it was written, or deleted), so nothing "
                        "says which model and settings made them; write to a new --output, or give --force-resume "
                        "to keep them as they are")
                logger.warning("%s: %d rows without a header kept (--force-resume): they are not checked against "
                               "this run's model and settings", path, len(self.done))
        except BaseException:
            self._lock.release()
            raise
        self._file: Any = None
        self._begun = False  # begin() was called: this run has something to add to the header's record
        self._added = 0
        self._seconds_before = 0.0
        self._tokens_before = 0
        self._started = time.perf_counter()
        self._saved = self._started
        self._tokens = 0

    @property
    def resuming(self) -> bool:
        return bool(self.done)

    def check_resume(self, *, model: str, backend: str, settings: dict[str, Any]) -> None:
        """Before the model loads: the header (if any) must name this model, backend and these settings."""
        if self.header is not None:
            check_resume(self.path, model=model, backend=backend, settings=settings)

    def begin(self, header: RunHeader) -> RunHeader:
        """Once the model is loaded: check the header against the model file and every setting, and write it before
        the first row."""
        old = start_run(self.path, header, resuming=self.header is not None)
        if old is not header:  # resuming: keep its record of earlier runs
            self._seconds_before, self._tokens_before = old.seconds, old.generated_tokens
            header = old
        self.header = header
        self._begun = True
        self._started = self._saved = time.perf_counter()
        self._write_header()
        return header

    def append(self, rows: Iterable[dict[str, Any]], *, tokens: int = 0) -> None:
        """Append rows (one write, one flush and fsync), counting ``tokens`` generated for them; the header is
        rewritten now and then."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not text:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._added += text.count("\n")
        self._tokens += tokens
        if time.perf_counter() - self._saved >= HEADER_EVERY_S:
            self._write_header()

    @property
    def added(self) -> int:
        """Rows this run has written."""
        return self._added

    def _write_header(self) -> None:
        if self.header is None:
            return
        now = time.perf_counter()
        self.header.pairs = len(self.done) + self._added
        self.header.seconds = self._seconds_before + (now - self._started)
        self.header.generated_tokens = self._tokens_before + self._tokens
        write_header(header_path(self.path), self.header)
        self._saved = now

    def close(self) -> None:
        """Write the header's final counts, close the file and release the lock. A run that wrote no row into a file
        that did not exist leaves neither the file nor a header behind; one that never began (nothing left to score)
        leaves the header as the runs before it wrote it."""
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._added == 0 and not self.existed:
                self.path.unlink(missing_ok=True)
                header_path(self.path).unlink(missing_ok=True)
            elif self._begun:
                self._write_header()
        finally:
            self._lock.release()

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
