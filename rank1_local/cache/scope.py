"""Lookups and stores of one model file under one set of settings."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from rank1_local.cache.keys import KeyMaker
from rank1_local.cache.sqlite_file import Row
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result, build_result


class JudgmentCache(Protocol):
    """What a scope needs of its cache (:class:`~rank1_local.cache.store.JudgmentCache`)."""

    hits: int
    misses: int

    def rows(self, keys: list[str]) -> dict[str, Row]: ...
    def put(self, key: str, model_digest: str, result: Rank1Result, model_name: str) -> None: ...


class CacheScope:
    """The judgments of one model file (by content digest) under one settings JSON. ``hits`` / ``misses`` count
    pairs."""

    def __init__(self, cache: JudgmentCache, model_digest: str, settings_json: str, model_name: str = "", *,
                 enabled: bool = True) -> None:
        self.cache = cache
        self.enabled = enabled  # False when the model file could not be hashed: every lookup misses
        self.model_digest = model_digest
        self.model_name = model_name
        self.settings_json = settings_json
        self.hits = 0
        self.misses = 0
        self._keys = KeyMaker(model_digest, settings_json)
        self._lock = threading.Lock()

    def key(self, prompt: str) -> str:
        """The cache key of a full prompt text under this scope."""
        return self._keys.key(prompt)

    def lookup(self, pairs: Sequence[PreparedPair]) -> dict[int, Rank1Result]:
        """Stored results of ``pairs`` by pair index (``cached=True``; ``seconds`` = the lookup's time). Pairs too
        long for the context are never looked up (they are not run). Never raises."""
        start = time.perf_counter()
        wanted = [(p, self.key(p.prompt)) for p in pairs if not p.too_long]
        if not wanted:
            return {}
        found = self.cache.rows(list(dict.fromkeys(k for _, k in wanted))) if self.enabled else {}
        seconds = time.perf_counter() - start
        out = {}
        for pair, key in wanted:
            row = found.get(key)
            if row is not None:
                score, reasoning, n_tokens, forced = row
                out[pair.index] = build_result(pair, score=score, reasoning=reasoning, n_tokens=n_tokens,
                                               forced=forced, seconds=seconds, cached=True)
        with self._lock:
            self.hits += len(out)
            self.misses += len(wanted) - len(out)
        self.cache.hits += len(out)
        self.cache.misses += len(wanted) - len(out)
        return out

    def store(self, pair: PreparedPair, result: Rank1Result) -> None:
        """Keep ``result`` of ``pair`` (not a too-long pair's, nor a cached one's, nor a non-finite score): handed to
        the cache's writer thread. Never blocks on the file, never raises."""
        if not self.enabled or pair.too_long or result.too_long or result.cached or not math.isfinite(result.score):
            return
        self.cache.put(self.key(pair.prompt), self.model_digest, result, self.model_name)
