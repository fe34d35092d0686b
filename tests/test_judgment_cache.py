"""The judgment cache: exact reuse, keys, several processes, and files it cannot use (which never fail a request).

The quick tier runs the store on hand-made pairs and results with a small fake "model file"; the full tier runs
``Rank1`` and the CLI on the behaving fixture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pipeline_support import run, serial_pipeline

from rank1_local.cache.store import CacheFileError, JudgmentCache
from rank1_local.core.config import ScoringConfig
from rank1_local.core.pairs import PreparedPair
from rank1_local.core.results import Rank1Result, build_result
from rank1_local.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
LOGGER = "rank1_local.cache.store"
SETTINGS = ScoringConfig(max_think_tokens=64, n_ctx=512).to_dict()

quick = pytest.mark.quick


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Digest memos and default cache paths under the test's folder, not the user's."""
    monkeypatch.setenv("RANK1_LOCAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


def pair(index: int, prompt: str, *, too_long: bool = False, dropped: int = 0) -> PreparedPair:
    return PreparedPair(index, "q", prompt, list(range(len(prompt) % 50 + 3)), passage_tokens_dropped=dropped,
                        too_long=too_long)


def judged(p: PreparedPair, score: float | None = None) -> Rank1Result:
    """A made-up result for ``p``, fixed by its prompt."""
    h = hashlib.sha256(p.prompt.encode()).digest()
    value = score if score is not None else struct.unpack("<Q", h[:8])[0] / 2**64
    return build_result(p, score=value, reasoning=f"réflexion 🤔 {p.prompt}\n\x00end", n_tokens=h[8],
                        forced=bool(h[9] & 1), seconds=1.5)


def same_judgment(a: Rank1Result, b: Rank1Result) -> bool:
    return (struct.pack("<d", a.score) == struct.pack("<d", b.score) and a.reasoning == b.reasoning
            and a.n_tokens == b.n_tokens and a.forced == b.forced)


def file_state(path: Path) -> tuple[str, list[str]]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(p.name for p in path.parent.glob(path.name + "*"))


# -- keys ------------------------------------------------------------------------------------------------------------


@quick
def test_keys_change_with_each_setting_the_model_and_the_prompt(tmp_path, model_file):
    cache = JudgmentCache(tmp_path / "c.sqlite3")
    base = cache.scope(model_file, SETTINGS)
    key = base.key("prompt")
    assert cache.scope(model_file, dict(reversed(list(SETTINGS.items())))).key("prompt") == key  # canonical JSON
    changed = {"max_think_tokens": 65, "n_ctx": 1024, "prompt_template": "FILL_QUERY_HERE?", "rethink_rounds": 1,
               "protocol": "full", "truncate_passages": True}
    assert set(changed) == set(SETTINGS)  # a new protocol setting needs a line here
    keys = {cache.scope(model_file, {**SETTINGS, name: value}).key("prompt") for name, value in changed.items()}
    keys |= {cache.scope(model_file, {**SETTINGS, "engine": {"device": "CPU"}}).key("prompt")}
    assert key not in keys and len(keys) == len(changed) + 1

    other = tmp_path / "other.gguf"
    other.write_bytes(model_file.read_bytes()[:-1] + b"!")
    assert cache.scope(other, SETTINGS).key("prompt") != key
    assert base.key("prompt ") != key and base.key("Prompt") != key
    copy = tmp_path / "copy.gguf"  # the key follows the file's content, not its name
    copy.write_bytes(model_file.read_bytes())
    assert cache.scope(copy, SETTINGS).key("prompt") == key


# -- the store ------------------------------------------------------------------------------------------------------


@quick
def test_round_trip_is_exact(tmp_path, model_file):
    pairs = [pair(0, "a"), pair(1, "b ünïcödé 日本 🤖", dropped=7), pair(2, "c")]
    with JudgmentCache(tmp_path / "c.sqlite3") as cache:
        scope = cache.scope(model_file, SETTINGS)
        assert scope.lookup(pairs) == {}
        stored = {p.index: judged(p) for p in pairs}
        stored[2] = judged(pairs[2], score=float.fromhex("0x1.5555555555555p-2"))
        for p in pairs:
            scope.store(p, stored[p.index])
    again = JudgmentCache(tmp_path / "c.sqlite3").scope(model_file, SETTINGS)  # another object: read from the file
    moved = [dataclasses.replace(p, index=p.index + 10) for p in reversed(pairs)]
    got = again.lookup(moved)
    assert sorted(got) == [10, 11, 12]
    for p in moved:
        hit, want = got[p.index], stored[p.index - 10]
        assert same_judgment(hit, want) and hit.cached and not want.cached
        assert hit.index == p.index and hit.truncated == want.truncated
        assert hit.passage_tokens_dropped == p.passage_tokens_dropped
        assert hit.n_prompt_tokens == len(p.ids) and 0 <= hit.seconds < 1
    assert (again.hits, again.misses) == (3, 0)


@quick
def test_too_long_pairs_and_non_finite_scores_are_not_stored(tmp_path, model_file):
    scope = JudgmentCache(tmp_path / "c.sqlite3").scope(model_file, SETTINGS)
    long, nan = pair(0, "long", too_long=True), pair(1, "nan")
    scope.store(long, judged(long, score=0.5))
    scope.store(nan, judged(nan, score=float("nan")))
    assert scope.lookup([long, nan]) == {} and (scope.hits, scope.misses) == (0, 1)  # too long: not even looked up
    assert scope.cache.stats().rows == 0


@quick
def test_stats_count_rows_models_and_hits_and_clear_empties(tmp_path, model_file):
    path = tmp_path / "c.sqlite3"
    assert not JudgmentCache(path).stats().exists and not path.exists()  # stats does not create the file
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    cache = JudgmentCache(path)
    a, b = cache.scope(model_file, SETTINGS), cache.scope(other, SETTINGS)
    for i in range(5):
        a.store(pair(i, f"p{i}"), judged(pair(i, f"p{i}")))
    b.store(pair(0, "p0"), judged(pair(0, "p0")))
    a.lookup([pair(0, "p0"), pair(1, "p1")])
    a.lookup([pair(0, "p0")])
    stats = cache.stats()
    assert (stats.rows, stats.models, stats.hits) == (6, 2, 3)
    assert sorted(stats.rows_per_model.values()) == [1, 5] and stats.oldest <= stats.newest
    assert cache.clear(b.model_digest) == 1 and cache.stats().rows == 5
    assert cache.clear() == 5 and cache.stats().rows == 0
    assert a.lookup([pair(0, "p0")]) == {}


class Tokens:
    """A byte tokenizer for the pipeline (the cache keys on prompt text, not on ids)."""

    def tokenize(self, text):
        return list(text.encode())

    def detokenize(self, ids):
        return bytes(ids).decode("utf-8", "ignore")


def cached_pipeline(cache: JudgmentCache, model_file: Path, scorer) -> Pipeline:
    config = ScoringConfig(max_think_tokens=64, n_ctx=512)
    return serial_pipeline(Tokens(), scorer, config, cache=cache, model_path=model_file,
                           cache_settings=lambda c: c.to_dict())


@quick
def test_the_pipeline_scores_only_misses_and_keeps_order(tmp_path, model_file):
    calls: list[list[str]] = []

    def scorer(todo, config, deliver, cancelled):
        calls.append([p.prompt.split("Passage: ")[1].split("\n")[0] for p in todo])
        for p in reversed(todo):  # finishes out of order, like the scheduler
            deliver(p, judged(p))

    cache = JudgmentCache(tmp_path / "c.sqlite3")
    pipe = cached_pipeline(cache, model_file, scorer)
    seen: list[Rank1Result] = []
    first, _ = run(pipe, [("q", "a"), ("q", "b")], on_result=seen.append)
    assert calls == [["a", "b"]] and [r.index for r in first] == [0, 1]
    assert sorted(r.index for r in seen) == [0, 1] and not any(r.cached for r in first)

    seen.clear()
    second, _ = run(pipe, [("q", "d"), ("q", "b"), ("q", "a")], on_result=seen.append)
    assert calls[1] == ["d"]
    assert [r.index for r in second] == [0, 1, 2] and [r.cached for r in second] == [False, True, True]
    assert sorted(r.index for r in seen) == [0, 1, 2]
    assert same_judgment(second[2], first[0])
    cache.close()
    assert JudgmentCache(tmp_path / "c.sqlite3").stats().rows == 3


@quick
def test_interrupted_scoring_keeps_what_finished(tmp_path, model_file):
    def dies(todo, config, deliver, cancelled):
        deliver(todo[0], judged(todo[0]))
        raise KeyboardInterrupt

    cache = JudgmentCache(tmp_path / "c.sqlite3")
    with pytest.raises(KeyboardInterrupt):
        run(cached_pipeline(cache, model_file, dies), [("q", "a"), ("q", "b")])
    cache.close()  # what finished is written on close
    again = cached_pipeline(JudgmentCache(tmp_path / "c.sqlite3"), model_file, dies)
    scope = again.scope(again.default_config)
    assert list(scope.lookup(again.prepare([("q", "a"), ("q", "b")], again.default_config))) == [0]


# -- several writers ------------------------------------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_judgment_cache import SETTINGS, judged, pair, same_judgment
from rank1_local.cache.store import JudgmentCache

w, path, model, go = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
cache = JudgmentCache(path, timeout=60.0)  # a loaded CI machine must not time out
scope = cache.scope(model, SETTINGS)
mine = [pair(i, f"writer {{w}} pair {{i}}") for i in range(150)]
mine += [pair(1000 + i, f"shared {{i}}") for i in range(50)]  # the same rows from every writer
for k, p in enumerate(mine):
    scope.store(p, judged(p))
    if k % 10 == 9:
        got = scope.lookup(mine[:k + 1])
        assert len(got) == k + 1 and all(same_judgment(got[q.index], judged(q)) for q in mine[:k + 1])
cache.close()
print("ok", w)
"""


@quick
def test_concurrent_writers_in_several_processes(tmp_path, model_file):
    path, go = tmp_path / "c.sqlite3", tmp_path / "go"
    JudgmentCache(path).scope(model_file, SETTINGS)  # the model digest is remembered once, not by every writer
    script = WRITER.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w), str(path), str(model_file), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for w in range(4)]
    time.sleep(0.5)
    go.touch()
    for w, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.split() == ["ok", str(w)], err
        assert "WARNING" not in err, err  # nobody waited past the timeout or lost the cache
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the losers' drafts are gone
    every = [pair(i, f"writer {w} pair {i}") for w in range(4) for i in range(150)]
    every += [pair(1000 + i, f"shared {i}") for i in range(50)]
    every = [dataclasses.replace(p, index=k) for k, p in enumerate(every)]
    got = JudgmentCache(path).scope(model_file, SETTINGS).lookup(every)
    assert len(got) == len(every) and all(same_judgment(got[p.index], judged(p)) for p in every)
    assert JudgmentCache(path).stats().rows == len(every)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@quick
def test_threads_share_one_cache(tmp_path, model_file):
    from concurrent.futures import ThreadPoolExecutor

    cache = JudgmentCache(tmp_path / "c.sqlite3")
    scope = cache.scope(model_file, SETTINGS)

    def work(t: int) -> int:
        mine = [pair(i, f"thread {t} pair {i}") for i in range(40)]
        for p in mine:
            scope.store(p, judged(p))
        return len(scope.lookup(mine))

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, range(4))) == [40] * 4
    assert cache.stats().rows == 160 and scope.hits == 160


# -- files the cache cannot use -------------------------------------------------------------------------------------


def _truncated_db(path: Path, model_file: Path) -> None:
    with JudgmentCache(path) as cache:
        scope = cache.scope(model_file, SETTINGS)
        for i in range(200):
            scope.store(pair(i, f"p{i} " + "x" * 1000), judged(pair(i, f"p{i}")))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


BAD_FILES = {
    "random bytes": lambda path, _: path.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(40000))),
    "text file": lambda path, _: path.write_text("my notes, not a database\n" * 100),
    "truncated database": _truncated_db,
    "another program's database": lambda path, _: sqlite3.connect(path).executescript(
        "CREATE TABLE t (x); INSERT INTO t VALUES (1);").close(),
}


@quick
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unusable_file_warns_once_scores_without_cache_and_is_left_alone(tmp_path, model_file, kind, caplog):
    path = tmp_path / "c.sqlite3"
    BAD_FILES[kind](path, model_file)
    before = file_state(path)
    cache = JudgmentCache(path)
    scope = cache.scope(model_file, SETTINGS)
    pairs = [pair(0, "p0"), pair(1, "p1")]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert scope.lookup(pairs) == {}
            for p in pairs:
                scope.store(p, judged(p))
        cache.close()
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0].getMessage() and "continues without the cache" in warnings[0].getMessage()
    assert not cache.enabled and scope.misses == 6
    assert file_state(path) == before  # not rewritten, not deleted, no journal files left

    with pytest.raises(CacheFileError, match="--force"):
        cache.stats()
    with pytest.raises(CacheFileError, match="cannot be used as a judgment cache"):
        cache.clear()
    assert file_state(path) == before
    assert cache.clear(force=True) == 0  # only when asked: replaced by an empty cache that works
    scope = cache.scope(model_file, SETTINGS)
    scope.store(pairs[0], judged(pairs[0]))
    assert list(scope.lookup(pairs)) == [0] and cache.stats().rows == 1


@quick
def test_newer_schema_is_not_touched(tmp_path, model_file, caplog):
    path = tmp_path / "c.sqlite3"
    with JudgmentCache(path) as cache:
        cache.scope(model_file, SETTINGS).store(pair(0, "p"), judged(pair(0, "p")))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE rank1_meta SET value = '99' WHERE name = 'schema_version'")
    before = file_state(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert JudgmentCache(path).scope(model_file, SETTINGS).lookup([pair(0, "p")]) == {}
    assert "schema version 99" in caplog.text and file_state(path) == before


@quick
def test_a_file_of_another_schema_is_refused_before_anything_is_written(tmp_path, model_file, caplog):
    """An older schema's file, made by an older tool: rollback journal, its own tables. Switching it to WAL or adding
    this version's tables before reading its version would change it (and leave -wal/-shm files beside it)."""
    path = tmp_path / "c.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("PRAGMA journal_mode = DELETE; CREATE TABLE rank1_meta (name TEXT PRIMARY KEY, value TEXT);"
                       "INSERT INTO rank1_meta VALUES ('schema_version', '0');"
                       "CREATE TABLE judgments_v0 (key TEXT, score REAL); INSERT INTO judgments_v0 VALUES ('k', 0.5);")
    conn.close()
    before = file_state(path)
    cache = JudgmentCache(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scope = cache.scope(model_file, SETTINGS)
        assert scope.lookup([pair(0, "p")]) == {}
        scope.store(pair(0, "p"), judged(pair(0, "p")))
        cache.close()
    assert "schema version 0" in caplog.text and not cache.enabled
    assert file_state(path) == before  # same bytes, no journal files beside it
    with pytest.raises(CacheFileError, match="schema version 0"):
        cache.stats()
    assert file_state(path) == before


@quick
def test_a_cache_file_deleted_while_in_use_is_noticed_and_made_again(tmp_path, model_file, caplog):
    path = tmp_path / "c.sqlite3"
    cache = JudgmentCache(path)
    scope = cache.scope(model_file, SETTINGS)
    scope.store(pair(0, "a"), judged(pair(0, "a")))
    assert cache.flush(5) and list(scope.lookup([pair(0, "a")])) == [0]
    for f in path.parent.glob(path.name + "*"):
        f.unlink()  # deleted under the running process (rm, a cleanup job)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert scope.lookup([pair(0, "a")]) == {}  # the old judgments went with the file
        for i in (1, 2):
            scope.store(pair(i, f"b{i}"), judged(pair(i, f"b{i}")))
        assert cache.flush(5)
        assert list(scope.lookup([pair(1, "b1"), pair(2, "b2")])) == [1, 2]
    replaced = [r for r in caplog.records if "deleted or replaced" in r.getMessage()]
    assert len(replaced) == 1 and replaced[0].levelno == logging.WARNING
    cache.close()
    assert path.exists() and JudgmentCache(path).stats().rows == 2  # kept in the new file, not a deleted inode


@quick
def test_unwritable_place_scores_without_cache(tmp_path, model_file, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    scope = JudgmentCache(blocker / "c.sqlite3").scope(model_file, SETTINGS)  # its folder cannot be made
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert scope.lookup([pair(0, "p")]) == {}
        scope.store(pair(0, "p"), judged(pair(0, "p")))
        scope.cache.close()
    assert "continues without the cache" in caplog.text


@quick
def test_read_only_file_is_still_read(tmp_path, model_file, monkeypatch, caplog):
    path = tmp_path / "c.sqlite3"
    with JudgmentCache(path) as first:
        first.scope(model_file, SETTINGS).store(pair(0, "old"), judged(pair(0, "old")))
    cache = JudgmentCache(path)
    scope = cache.scope(model_file, SETTINGS)
    connect = cache.connect

    class ReadOnly:  # the file's writes fail as on a read-only mount (root ignores permission bits)
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql.split()[0] in ("BEGIN", "INSERT", "UPDATE"):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    monkeypatch.setattr(cache, "connect", lambda **kw: ReadOnly(connect(**kw)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert list(scope.lookup([pair(0, "old"), pair(1, "new")])) == [0]  # its hit count is not kept
            scope.store(pair(1, "new"), judged(pair(1, "new")))
            cache.flush(5)
    assert caplog.text.count("read-only") == 1 and cache.enabled
    cache.close()
    monkeypatch.undo()
    assert list(JudgmentCache(path).scope(model_file, SETTINGS).lookup([pair(1, "new")])) == []  # not stored


@quick
def test_locked_database_never_fails_a_request(tmp_path, model_file, caplog):
    path = tmp_path / "c.sqlite3"
    with JudgmentCache(path) as first:
        first.scope(model_file, SETTINGS).store(pair(0, "old"), judged(pair(0, "old")))
    cache = JudgmentCache(path, timeout=0.2)
    scope = cache.scope(model_file, SETTINGS)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert list(scope.lookup([pair(0, "old"), pair(1, "new")])) == [0]  # WAL: reads go on while it writes
            scope.store(pair(1, "new"), judged(pair(1, "new")))  # returns at once: the writer waits, not us
            assert not cache.flush(1.0)
            assert sorted(scope.lookup([pair(0, "old"), pair(1, "new")])) == [0, 1]  # served from memory
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "locked" in caplog.text and cache.enabled  # only busy: the cache is not switched off
    assert cache.flush(5)
    cache.close()
    with JudgmentCache(path) as reread:
        assert sorted(reread.scope(model_file, SETTINGS).lookup([pair(0, "old"), pair(1, "new")])) == [0, 1]

    hog = sqlite3.connect(path, isolation_level=None)  # a connection that keeps the file to itself
    hog.execute("PRAGMA locking_mode = EXCLUSIVE")
    hog.execute("BEGIN EXCLUSIVE")
    hog.execute("UPDATE judgments SET hits = hits")
    hog.execute("COMMIT")
    try:
        locked_out = JudgmentCache(path, timeout=0.2).scope(model_file, SETTINGS)
        assert locked_out.lookup([pair(0, "old")]) == {} and locked_out.cache.enabled  # skipped, not broken
    finally:
        hog.close()
    assert list(locked_out.lookup([pair(0, "old")])) == [0]  # works again once the lock is gone


@quick
def test_a_lock_released_within_the_timeout_is_waited_for(tmp_path, model_file, caplog):
    path = tmp_path / "c.sqlite3"
    with JudgmentCache(path) as first:
        first.scope(model_file, SETTINGS).store(pair(0, "old"), judged(pair(0, "old")))
    hog = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    hog.execute("PRAGMA locking_mode = EXCLUSIVE")  # another process opening, recovering or closing the file
    hog.execute("BEGIN EXCLUSIVE")
    hog.execute("UPDATE judgments SET hits = hits")
    hog.execute("COMMIT")
    threading.Timer(0.3, hog.close).start()
    scope = JudgmentCache(path, timeout=30.0).scope(model_file, SETTINGS)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert list(scope.lookup([pair(0, "old")])) == [0]
        scope.store(pair(1, "new"), judged(pair(1, "new")))
    assert "locked" not in caplog.text
    assert sorted(scope.lookup([pair(0, "old"), pair(1, "new")])) == [0, 1]


@quick
def test_busy_errors_without_a_wait_are_tried_again_until_the_timeout(tmp_path, caplog):
    """SQLite returns SQLITE_BUSY at once, without its busy handler, while another process recovers or closes
    the file's last connection: the cache tries again itself, and says how long it waited when it gives up."""
    cache = JudgmentCache(tmp_path / "c.sqlite3", timeout=0.3)
    calls = []

    def busy_twice(conn):
        calls.append(conn)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert cache._attempt("skipped", busy_twice, "default") == "done" and len(calls) == 3

    def always_busy(conn):
        raise sqlite3.OperationalError("database is locked")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        started = time.monotonic()
        assert cache._attempt("this lookup is skipped", always_busy, "default") == "default"
        assert 0.2 < time.monotonic() - started < 5
    said = re.search(r"locked by another process \(waited (\d+\.\d) s of 0\.3 s", caplog.text)
    assert said and 0.2 <= float(said.group(1)) < 5, caplog.text  # the real wait, which a slow sleep may stretch
    assert cache.enabled

    def broken(conn):
        raise sqlite3.DatabaseError("file is not a database")

    assert cache._attempt("skipped", broken, "default") == "default" and not cache.enabled  # not retried


@quick
def test_a_new_cache_file_appears_whole(tmp_path, model_file):
    path = tmp_path / "sub" / "c.sqlite3"
    JudgmentCache(path).scope(model_file, SETTINGS).lookup([pair(0, "a")])
    with open(path, "rb") as f:
        header = f.read(100)
    assert header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"  # WAL from the start
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM rank1_meta").fetchone() == ("1",)
    conn.close()


# -- the command line -----------------------------------------------------------------------------------------------


@quick
def test_cache_commands(tmp_path, model_file, capsys):
    from rank1_local.cli.main import main

    path = tmp_path / "c.sqlite3"
    scope = JudgmentCache(path).scope(model_file, SETTINGS)
    for i in range(3):
        scope.store(pair(i, f"p{i}"), judged(pair(i, f"p{i}")))
    scope.cache.close()
    assert main(["cache", "stats", "--cache", str(path), "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows"], stats["models"], stats["rows_per_model"]) == (3, 1, {scope.model_digest: 3})
    assert main(["cache", "stats", "--cache", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rows    3" in out and f"model model.gguf  {scope.model_digest}  3 rows" in out  # named by file name
    assert main(["cache", "clear", "--cache", str(path), "--model", str(model_file)]) == 0
    assert "removed 3 judgments" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache", str(path)]) == 0
    assert "removed 0 judgments" in capsys.readouterr().out

    path.write_text("not a database")
    assert main(["cache", "stats", "--cache", str(path)]) == 2
    assert "not a SQLite database" in capsys.readouterr().err and path.read_text() == "not a database"


@quick
def test_cache_flag_defaults_and_other_backends(tmp_path, home, capsys):
    from rank1_local.cli.main import build_parser, main

    parse = build_parser().parse_args
    from rank1_local.cli.cache_commands import cache_path

    assert cache_path(parse(["rerank", "--model", "m"])) is None
    assert cache_path(parse(["rerank", "--model", "m", "--cache"])) == home / "judgments.sqlite3"
    assert cache_path(parse(["rerank", "--model", "m", "--cache", str(tmp_path / "x.db")])) == tmp_path / "x.db"
    docs = tmp_path / "docs.txt"
    docs.write_text("a passage\n")
    for backend in ("transformers", "vllm"):
        assert main(["rerank", "--model", "m", "--backend", backend, "--cache", "--query", "q",
                     "--docs", str(docs)]) == 2
        assert "llama.cpp backend only" in capsys.readouterr().err


# -- full tier: Rank1 and the CLI on the behaving fixture -----------------------------------------------------------

COMMON = {"n_ctx": 512, "threads": 2, "max_think_tokens": 64, "parallel": 4}


@pytest.fixture(scope="module")
def gguf(exported):
    return exported("behaving", "Q8_0")


@pytest.fixture(scope="module")
def fixture_pairs():
    from quantize.fixtures.synthetic_task import eval_pairs

    return [(p.query, p.passage) for p in eval_pairs()[:6]]


def test_rank1_second_run_is_served_from_the_cache(gguf, fixture_pairs, tmp_path):
    from rank1_local import Rank1

    path = tmp_path / "c.sqlite3"
    with Rank1(gguf, cache=path, **COMMON) as model:
        first = model.score_pairs(fixture_pairs)
        assert model.last_stats.pairs == len(fixture_pairs) and not any(r.cached for r in first)
        seen: list[Rank1Result] = []
        second = model.score_pairs(fixture_pairs, on_result=seen.append)
        assert model.last_stats.pairs == 0 and model.last_stats.generated_tokens == 0  # nothing decoded
        assert sorted(r.index for r in seen) == list(range(len(fixture_pairs)))
        for a, b in zip(first, second, strict=True):
            assert same_judgment(a, b) and b.cached
            assert dataclasses.replace(b, cached=False, seconds=a.seconds) == a

        longer = dataclasses.replace(model.config, max_think_tokens=63)
        assert not any(r.cached for r in model.score_pairs(fixture_pairs[:2], config=longer))  # other settings
        assert model.engine.scope(model.config).hits == len(fixture_pairs)
        assert model.engine.scope(longer).misses == 2
        assert "engine" in model.cache_settings() and model.cache_settings()["max_think_tokens"] == 64

    with Rank1(gguf, cache=JudgmentCache(path), **COMMON) as again:  # another load, another object
        assert all(r.cached for r in again.score_pairs(fixture_pairs[::-1]))
    assert JudgmentCache(path).stats().rows == len(fixture_pairs) + 2


def test_cli_rerank_with_cache_then_stats_and_clear(gguf, fixture_pairs, tmp_path, capsys):
    from rank1_local.cli.main import main

    path = tmp_path / "c.sqlite3"
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(p for _, p in fixture_pairs[:4]) + "\n")
    args = ["-q", "rerank", "--model", str(gguf), "--query", fixture_pairs[0][0], "--docs", str(docs),
            "--format", "json", "--max-think-tokens", "64", "--n-ctx", "512", "--threads", "2", "--cache", str(path)]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert not any(row["cached"] for row in first) and all(row["cached"] for row in second)
    assert [{**row, "cached": False} for row in second] == first
    assert main(["cache", "stats", "--cache", str(path), "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 4 and stats["models"] == 1 and stats["hits"] == 4
    assert main(["cache", "clear", "--cache", str(path)]) == 0
    assert "removed 4 judgments" in capsys.readouterr().out
    assert main(["cache", "stats", "--cache", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 0


@quick
@pytest.mark.parametrize("damage", ["score = 'abc'", "score = 7.5", "n_tokens = -3", "reasoning = x'00ff'",
                                    "forced = 2"])
def test_a_row_that_does_not_read_back_is_a_miss_and_is_replaced(tmp_path, model_file, caplog, damage):
    path = tmp_path / "c.sqlite3"
    good = judged(pair(0, "p"))
    with JudgmentCache(path) as first:
        first.scope(model_file, SETTINGS).store(pair(0, "p"), good)
    with sqlite3.connect(path) as conn:  # edited outside rank1-local
        conn.execute(f"UPDATE judgments SET {damage}")
    conn.close()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with JudgmentCache(path) as cache:
            scope = cache.scope(model_file, SETTINGS)
            for _ in range(2):  # the warning is said once
                assert scope.lookup([pair(0, "p")]) == {}  # a miss, never an exception
    assert caplog.text.count("does not read back") == 1
    with JudgmentCache(path) as cache:  # the next judgment of the pair replaces the damaged row
        cache.scope(model_file, SETTINGS).store(pair(0, "p"), good)
    with JudgmentCache(path) as cache:
        (hit,) = cache.scope(model_file, SETTINGS).lookup([pair(0, "p")]).values()
    assert same_judgment(hit, good)


@quick
def test_a_good_row_is_never_replaced(tmp_path, model_file):
    path = tmp_path / "c.sqlite3"
    with JudgmentCache(path) as cache:
        cache.scope(model_file, SETTINGS).store(pair(0, "p"), judged(pair(0, "p"), 0.25))
    with JudgmentCache(path) as cache:
        cache.scope(model_file, SETTINGS).store(pair(0, "p"), judged(pair(0, "p"), 0.75))
    with JudgmentCache(path) as cache:
        (hit,) = cache.scope(model_file, SETTINGS).lookup([pair(0, "p")]).values()
    assert hit.score == 0.25


@quick
def test_a_cache_in_a_read_only_folder_is_read(tmp_path, model_file):
    """As a user who cannot write the folder (SQLite cannot make the journal's shared-memory file there): the
    judgments are read, as the warning says, and none is added."""
    import shutil
    import tempfile

    from test_bundles import _unprivileged

    folder = Path(tempfile.mkdtemp(prefix="rank1-perm-"))
    try:
        (folder / "ro").mkdir()
        model = folder / "model.gguf"
        shutil.copy(model_file, model)
        with JudgmentCache(folder / "ro" / "c.sqlite3") as cache:
            cache.scope(model, SETTINGS).store(pair(0, "p"), judged(pair(0, "p")))
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (folder / "ro").chmod(0o555)
        script = (
            "import sys, json\n"
            "from pathlib import Path\n"
            "from rank1_local.cache.store import JudgmentCache\n"
            "from rank1_local.core.pairs import PreparedPair\n"
            f"settings = json.loads({json.dumps(json.dumps(SETTINGS))})\n"
            "p = PreparedPair(0, 'q', 'p', list(range(4)))\n"
            f"cache = JudgmentCache(Path({str(folder / 'ro' / 'c.sqlite3')!r}))\n"
            f"scope = cache.scope(Path({str(model)!r}), settings)\n"
            "print(sorted(scope.lookup([p])), cache.read_only)\n"
            "cache.close()\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK1_LOCAL_HOME": str(folder / "home")}
        done = subprocess.run(_unprivileged([sys.executable, "-c", script]), capture_output=True, text=True,
                              env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[0] True", done.stdout + done.stderr
        assert "judgments are read from it" in done.stderr
        assert sorted(p.name for p in (folder / "ro").iterdir()) == ["c.sqlite3"]
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(folder)


@quick
def test_the_writer_survives_a_failing_batch_and_says_what_it_lost(tmp_path, model_file, monkeypatch, caplog):
    """An exception that is not SQLite's (a bug, memory) in one batch: that batch is lost, said loudly with its
    count; the writer thread goes on, later judgments are stored, and flush never waits on a dead thread."""
    import rank1_local.cache.writer as writer_module

    write = writer_module._write
    calls = []

    def flaky(conn, rows, hits):
        calls.append(len(rows))
        if len(calls) == 1:
            raise TypeError("a bug in a batch")
        return write(conn, rows, hits)

    monkeypatch.setattr(writer_module, "_write", flaky)
    cache = JudgmentCache(tmp_path / "c.sqlite3")
    scope = cache.scope(model_file, SETTINGS)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        scope.store(pair(0, "lost"), judged(pair(0, "lost")))
        assert cache.flush(5)
        scope.store(pair(1, "kept"), judged(pair(1, "kept")))
        assert cache.flush(5)
    assert "writing 1 judgment(s) failed (TypeError: a bug in a batch)" in caplog.text
    assert cache.writer().alive_in_this_process
    assert list(scope.lookup([pair(0, "lost"), pair(1, "kept")])) == [1]
    cache.close()


@quick
def test_hit_counts_waiting_for_a_locked_file_are_bounded(tmp_path, model_file, monkeypatch):
    import rank1_local.cache.writer as writer_module

    monkeypatch.setattr(writer_module, "MAX_PENDING", 10)
    cache = JudgmentCache(tmp_path / "c.sqlite3")
    writer = cache.writer()
    with writer._cond:  # the writer is held: nothing is written meanwhile
        writer.count_hits([f"key-{i}" for i in range(50)])
        assert len(writer._hits) == 10
    cache.close()


@quick
def test_engine_facts_say_device_and_version_1_keys_are_not_hit(tmp_path, model_file):
    """Where the model ran is ``device`` in the cache key's engine facts (version 1 called it ``backend``): the key's
    domain says version 2, so a judgment stored under a version 1 key is never served."""
    import hashlib

    from rank1_local.backends.llama.facade import LlamaSettings, engine_facts
    from rank1_local.cache.keys import canonical_settings

    facts = engine_facts("CPU", LlamaSettings())
    assert facts["device"] == "CPU" and "backend" not in facts
    settings = {**SETTINGS, "engine": facts}
    scope = JudgmentCache(tmp_path / "c.sqlite3").scope(model_file, settings)
    v1 = hashlib.sha256(b"rank1-local judgment v1\x00" + scope.model_digest.encode() + b"\x00" +
                        canonical_settings(settings).encode() + b"\x00" + b"prompt").hexdigest()
    assert scope.key("prompt") != v1
