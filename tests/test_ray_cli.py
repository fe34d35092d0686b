"""The ``--ray`` flags of ``rank1-local rerank|serve`` before any cluster is involved (quick tier: Ray is never
imported): flag errors, pairs validated on the driver, globs, and how pairs are cut into blocks of whole queries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rank1_local.cli.main import main
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.integrations.ray_batch import query_blocks
from rank1_local.integrations.ray_run_file import pair_files, read_all_pairs, validate_rows
from rank1_local.runs.inputs import PairRow

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parents[1]


def _pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(qid, docid, query="a query", text="a passage", **extra):
    return {"qid": qid, "query": query, "docid": docid, "text": text, **extra}


@pytest.mark.parametrize("argv, words", [
    (["rerank", "--model", "m.gguf", "--pairs", "p.jsonl", "--output", "o.jsonl", "--workers", "2"],
     "--workers needs --ray"),
    (["rerank", "--model", "m.gguf", "--pairs", "p.jsonl", "--output", "o.jsonl", "--workers", "2",
      "--gpus-per-worker", "1"], "--workers, --gpus-per-worker need --ray"),
    (["rerank", "--model", "m.gguf", "--query", "q", "--docs", "d.txt", "--ray"], "--ray scores a pairs file"),
    (["rerank", "--model", "m.gguf", "--pairs", "p.jsonl", "--output", "o.jsonl", "--ray", "--workers", "0"],
     "--workers must be at least 1"),
    (["serve", "--model", "m.gguf", "--replicas", "2"], "--replicas needs --ray"),
])
def test_ray_flags_are_checked_before_anything_starts(argv, words, capsys):
    assert main(["-q", *argv]) == 2
    assert words in capsys.readouterr().err


def test_a_bad_pair_fails_on_the_driver_before_ray_is_imported(tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl", [_row("q1", "d1"), _row("q2", "d2", query="   ")])
    code = ("import sys; from rank1_local.cli.main import main; "
            f"code = main(['-q', 'rerank', '--model', 'nowhere.gguf', '--pairs', {str(pairs)!r}, '--output', "
            f"{str(tmp_path / 'out.jsonl')!r}, '--ray', '--workers', '2']); print(code, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert f"error: {pairs}:2: query is empty" in out.stderr  # the file line, found on the driver
    assert not (tmp_path / "out.jsonl").exists()


def test_a_glob_reads_every_file_and_refuses_a_pair_in_two_of_them(tmp_path):
    _pairs(tmp_path / "a.jsonl", [_row("q1", "d1"), _row("q1", "d2")])
    _pairs(tmp_path / "b.jsonl", [_row("q2", "d1")])
    files = pair_files(str(tmp_path / "*.jsonl"))
    assert files == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert [(r.qid, r.docid) for r in read_all_pairs(files)] == [("q1", "d1"), ("q1", "d2"), ("q2", "d1")]
    _pairs(tmp_path / "c.jsonl", [_row("q1", "d2")])
    with pytest.raises(Rank1Error, match=r"c.jsonl: \(qid, docid\) \('q1', 'd2'\) is also in .*a.jsonl"):
        read_all_pairs(pair_files(str(tmp_path / "*.jsonl")))
    with pytest.raises(Rank1Error, match="no pairs file matches"):
        pair_files(str(tmp_path / "*.tsv"))


def test_validation_uses_the_protocol_checks():
    rows = [PairRow("q1", "query", "d1", "text"), PairRow("q1", "query", "d2", 7)]  # type: ignore[arg-type]
    with pytest.raises(Rank1Error, match=r"pair \(qid 'q1', docid 'd2'\): passage of pair 1 must be a string"):
        validate_rows(rows, ScoringConfig())
    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        validate_rows(rows[:1], ScoringConfig(prompt_template="no placeholder"))


def test_blocks_hold_whole_queries_in_input_order():
    rows = [PairRow(q, "query " + q, f"d{i}", "t") for i, q in enumerate("aabacbbbbbbd")]
    blocks = query_blocks(rows, pairs_per_block=4)
    assert [[r.qid for r in b] for b in blocks] == [["a", "a", "a"], ["b", "b", "b", "b", "b", "b", "b"], ["c", "d"]]
    assert [r.docid for b in blocks for r in b if r.qid == "a"] == ["d0", "d1", "d3"]
    assert sum(len(b) for b in blocks) == len(rows)
    with pytest.raises(Rank1Error, match="pairs_per_block must be at least 1"):
        query_blocks(rows, 0)


@pytest.mark.parametrize("options, words", [
    ({"replicas": 0}, "replicas must be at least 1"),
    ({"replicas": 3, "max_replicas": 2}, r"max_replicas \(2\) must be at least replicas \(3\)"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
    ({"threads_per_replica": 0}, "threads_per_replica must be at least 1"),
])
def test_serve_options_are_checked(options, words):
    from rank1_local.integrations.ray_serve import ServeOptions

    with pytest.raises(Rank1Error, match=words):
        ServeOptions(**options)


@pytest.mark.parametrize("flag, environ, address, source", [
    ("auto", {}, None, "no RAY_ADDRESS set"),  # never a cluster that merely runs here (another job's)
    (None, {}, None, "no RAY_ADDRESS set"),
    ("auto", {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379", "RAY_ADDRESS"),
    ("auto", {"RAY_ADDRESS": "local"}, None, "no RAY_ADDRESS set"),
    ("local", {"RAY_ADDRESS": "10.0.0.5:6379"}, None, "--ray local"),
    ("ray://head:10001", {"RAY_ADDRESS": "10.0.0.5:6379"}, "ray://head:10001", "--ray"),
])
def test_which_cluster_ray_means(flag, environ, address, source):
    from rank1_local.integrations.ray_cluster import choose_cluster

    choice = choose_cluster(flag, environ)
    assert choice.address == address and choice.source.startswith(source)


def test_an_http_server_or_nothing_at_the_address_is_named_at_once(tmp_path):
    """`--ray HOST:PORT` where a web server answers (rank1-local serve, Ray's dashboard) is named as an HTTP server in
    well under a second, and a port where nothing listens is refused at once; neither waits on Ray's retries."""
    import http.server
    import socket
    import threading
    import time

    from rank1_local.integrations.ray_cluster import ClusterChoice, probe_cluster

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        start = time.monotonic()
        with pytest.raises(Rank1Error, match=rf"{address} \(from --ray\) is an HTTP server, not a Ray cluster"):
            probe_cluster(ClusterChoice(address, "--ray"))
        assert time.monotonic() - start < 3
    finally:
        server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(Rank1Error, match=rf"cannot join the Ray cluster at 127.0.0.1:{free} \(from RAY_ADDRESS\)"):
        probe_cluster(ClusterChoice(f"127.0.0.1:{free}", "RAY_ADDRESS"))


def test_every_worker_gets_a_block_when_there_are_few_pairs():
    """96 pairs for 2 workers make 2 blocks of whole queries (128 pairs a block would leave a worker idle, and Ray Data
    warned that its pool of 2 received 1 input); a single query stays one block."""
    from rank1_local.integrations.ray_batch import block_size_for

    rows = [PairRow(f"q{i // 8}", "q", f"d{i}", "t") for i in range(96)]
    assert len(query_blocks(rows, block_size_for(len(rows), 2))) == 2
    assert len(query_blocks(rows, block_size_for(len(rows), 1))) == 1
    assert block_size_for(1000, 2) == 128 and block_size_for(10, 4, 2) == 2
    one_query = [PairRow("q", "q", f"d{i}", "t") for i in range(50)]
    assert len(query_blocks(one_query, block_size_for(50, 4))) == 1
