"""Admission: how many pairs may wait to be scored, decided at once and atomically, before a call costs anything.

A call reserves its pairs (:meth:`Admission.reserve`) under one lock before they are tokenized, so callers racing each
other cannot all pass the check; the reservation (:class:`Permit`) shrinks to the pairs that really go to the
backend once duplicates and cache hits are known, gives back one pair as each starts, and gives back the rest when
the call ends for any reason (finished, cancelled, failed). Like TEI's router, a full queue is refused at once
(:class:`Overloaded`: 503 with ``Retry-After``), and a call that could never fit is refused for good
(:class:`TooLarge`: 413).
"""

from __future__ import annotations

import threading

from rank1_local.core.errors import Rank1Error


class Overloaded(Rank1Error):
    """Too many pairs are waiting already; try again later (the server answers 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(Rank1Error):
    """A call with more pairs to score than may ever wait at once: it could never be admitted (the server answers
    413)."""


def check_max_waiting(value: int | None) -> None:
    """The waiting limit every backend's settings take: None (no limit) or at least 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise Rank1Error(f"max_waiting must be at least 1 (or None: no limit), got {value!r}")


class Admission:
    """Pairs admitted and not started, against a limit (None: no limit)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._outstanding = 0

    @property
    def outstanding(self) -> int:
        """Pairs admitted and not started yet (reserved for calls being prepared, or queued)."""
        return self._outstanding

    def reserve(self, n: int) -> Permit:
        """Reserve ``n`` pairs now, or refuse the call."""
        with self._lock:
            if self.limit is not None and n > self.limit:
                raise TooLarge(f"this request has {n} pairs to score, more than the {self.limit} that may wait at "
                               "once (--max-queue): it could never be admitted; send fewer documents per request")
            if self.limit is not None and n and self._outstanding + n > self.limit:
                raise Overloaded(f"{self._outstanding} pairs are waiting already and this request adds {n}, over "
                                 f"the limit of {self.limit} (--max-queue); try again shortly", retry_after=1.0)
            self._outstanding += n
        return Permit(self, n)

    def _give_back(self, n: int) -> None:
        with self._lock:
            self._outstanding -= n


class Permit:
    """One call's reserved pairs."""

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission = admission
        self._lock = threading.Lock()
        self.held = n

    def release(self, n: int = 1) -> None:
        """Give back ``n`` pairs (they started, or will never run); never more than are held."""
        with self._lock:
            n = min(n, self.held)
            self.held -= n
        if n:
            self._admission._give_back(n)

    def shrink_to(self, n: int) -> None:
        """Keep ``n`` pairs (those that go to the backend), give back the others."""
        self.release(max(0, self.held - n))

    def release_all(self) -> None:
        self.release(self.held)
