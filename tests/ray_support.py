"""Helpers of the Ray tests: pairs files of the behaving fixture's task, run files, and the processes of Ray
workers and Serve replicas (found by the title Ray gives them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantize.fixtures.synthetic_task import all_words, make_pair

N_CTX, BUDGET, PARALLEL = 512, 64, 4


def write_pairs(path: Path, n_queries: int = 12, per_query: int = 8) -> list[tuple[str, str]]:
    """A pairs file of ``n_queries`` queries with ``per_query`` passages each (queries interleaved, as a retriever's
    output merged from several files would be); its keys, in file order."""
    words = all_words()
    rows = []
    for k in range(per_query):
        for q in range(n_queries):
            query_word, passage_word = words[q * 3 % len(words)], words[(q * 7 + k * 5) % len(words)]
            pair = make_pair(query_word, passage_word)
            rows.append({"qid": f"q{q}", "query": pair.query, "docid": f"d{k}-{passage_word}", "text": pair.passage})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [(r["qid"], r["docid"]) for r in rows]


def read_run(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["qid"], r["docid"]): r for r in rows}


def processes(title: str) -> list[int]:
    """PIDs of the processes whose command line (Ray sets it to the actor's name) contains ``title``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title in cmdline:
            found.append(int(entry.name))
    return found


def compare_runs(got: list[dict], reference: list[dict]) -> float:
    """Asserts ``got`` has every pair of ``reference`` exactly once, with the same row format, reasoning, decision
    and flags; returns the largest |Δscore|."""
    keys = [(r["qid"], r["docid"]) for r in got]
    assert len(keys) == len(set(keys)), "a pair appears twice"
    expected = by_key(reference)
    assert set(keys) == set(expected), "pairs missing or extra"
    worst = 0.0
    for row in got:
        ref = expected[(row["qid"], row["docid"])]
        assert list(row) == list(ref)
        assert row["reasoning"] == ref["reasoning"] and row["n_tokens"] == ref["n_tokens"]
        assert (row["forced"], row["truncated"], row["too_long"]) == (ref["forced"], ref["truncated"], ref["too_long"])
        worst = max(worst, abs(row["score"] - ref["score"]))
    return worst
