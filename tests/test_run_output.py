"""Run files cannot be mixed or doubled: the header comes first, one writer at a time, no output where it must not go,
and a header whose counts are the file's (quick tier: a scripted engine behind a real ``Rank1``, no model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from fake_engine import FakeEngine, scripted, scripted_rank1

from rank1_local.cli.main import main
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.runs.output_lock import OutputLock, lock_path
from rank1_local.runs.run_file import score_pairs_file
from rank1_local.runs.run_header import header_path, read_header
from rank1_local.runs.run_output import RunOutput

pytestmark = pytest.mark.quick

CONFIG = ScoringConfig(max_think_tokens=64, n_ctx=512)
TESTS = Path(__file__).parent


def pairs_file(folder: Path, n: int = 6) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"qid": "q", "query": "x", "docid": f"d{i}", "text": f"passage {i}"}) + "\n"
                            for i in range(n)))
    return path


def scripted_model(model_file: Path, config: ScoringConfig = CONFIG, on_decode=None):
    engine = FakeEngine(scripted({}, default="\nFine.</think> true"))
    if on_decode is not None:
        decode = engine.decode

        def hooked(entries):
            on_decode()
            return decode(entries)

        engine.decode = hooked
    return scripted_rank1(engine, 2, config, model_path=model_file)


def model_file(folder: Path) -> Path:
    """A file standing for the model (run headers record its path and size)."""
    path = folder / "scripted.gguf"
    if not path.exists():
        path.write_bytes(b"GGUF" + bytes(60))
    return path


def run_scripted(pairs: Path, out: Path, config: ScoringConfig = CONFIG, **kw):
    model = model_file(pairs.parent)
    return score_pairs_file(pairs, out, lambda: scripted_model(model, config), model_arg=str(model),
                            backend="llama.cpp", settings=config.to_dict(), progress=False, **kw)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


# --- the header first -----------------------------------------------------------------------------------------------

KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_run_output import CONFIG, model_file, scripted_model
    from rank1_local.runs.run_file import score_pairs_file
    from rank1_local.core.results import Rank1Result
    seen = []
    path = model_file(Path(sys.argv[1]).parent)
    def make():
        model = scripted_model(path)
        score = model.score_pairs
        def score_pairs(pairs, *, config=None, on_result=None):
            def each(result):
                on_result(result)
                seen.append(result)
                if len(seen) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-run, as an OOM kill would
            return score(pairs, config=config, on_result=each)
        model.score_pairs = score_pairs
        return model
    score_pairs_file(Path(sys.argv[1]), Path(sys.argv[2]), make, model_arg=str(path), backend="llama.cpp",
                     settings=CONFIG.to_dict(), progress=False)
""")


def test_a_killed_run_leaves_a_header_and_the_next_run_is_checked_against_it(tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "k.jsonl"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(pairs), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(rows(out)) == 3 and header_path(out).is_file()  # the header was written before the first row
    # the next run with other settings is refused, naming the difference, before its model loads
    other = ScoringConfig(max_think_tokens=32, n_ctx=512)
    with pytest.raises(Rank1Error, match="max_think_tokens: 64 in the file, 32 now"):
        run_scripted(pairs, out, other)
    assert len(rows(out)) == 3
    # the same settings resume, and the header counts what the file holds
    assert run_scripted(pairs, out) == 3
    assert len(rows(out)) == 6 and read_header(header_path(out)).pairs == 6



def test_a_finished_run_run_again_keeps_its_header_s_time_and_tokens(tmp_path):
    """Running a finished file again scores nothing, and leaves its header's record of the runs that made it (the
    study times its points from it) as it was, not the time of a run that did nothing."""
    pairs, out = pairs_file(tmp_path), tmp_path / "done.jsonl"
    assert run_scripted(pairs, out) == 6
    before = header_path(out).read_bytes()
    assert read_header(header_path(out)).generated_tokens > 0
    assert run_scripted(pairs, out) == 0
    assert header_path(out).read_bytes() == before

def test_rows_without_a_header_are_refused_unless_forced(tmp_path, capsys):
    pairs, out = pairs_file(tmp_path), tmp_path / "k.jsonl"
    out.write_text("".join(json.dumps({"qid": "q", "docid": f"d{i}", "score": 0.5}) + "\n" for i in range(2)))
    before = out.read_bytes()
    with pytest.raises(Rank1Error, match=r"holds 2 rows but no header .*--force-resume"):
        run_scripted(pairs, out)
    assert out.read_bytes() == before and not header_path(out).exists()
    assert main(["-q", "rerank", "--model", "missing.gguf", "--pairs", str(pairs), "--output", str(out)]) == 2
    assert "no header" in capsys.readouterr().err
    assert run_scripted(pairs, out, force_resume=True) == 4
    assert out.read_bytes().startswith(before) and read_header(header_path(out)).pairs == 6


def test_a_header_without_rows_describes_nothing(tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "k.jsonl"
    assert run_scripted(pairs, out) == 6
    out.unlink()  # the rows are gone: the header they had describes nothing
    assert run_scripted(pairs, out, ScoringConfig(max_think_tokens=32, n_ctx=512)) == 6
    assert read_header(header_path(out)).settings["max_think_tokens"] == 32


@pytest.mark.parametrize("change, message", [
    ({"settings": None}, "settings is null, expected dict"),
    ({"pairs": "x"}, 'pairs is "x", expected int'),
    ({"seconds": True}, "seconds is true"),
])
def test_a_damaged_header_is_refused_naming_the_field(tmp_path, change, message):
    pairs, out = pairs_file(tmp_path), tmp_path / "k.jsonl"
    run_scripted(pairs_file(tmp_path, 3), out)
    header = json.loads(header_path(out).read_text())
    header_path(out).write_text(json.dumps(header | change))
    with pytest.raises(Rank1Error, match=message):
        run_scripted(pairs, out)
    header_path(out).write_text("[" * 100_000)
    with pytest.raises(Rank1Error, match="not a run header"):
        run_scripted(pairs, out)


# --- one writer ----------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "two.jsonl"
    started, release = threading.Event(), threading.Event()

    def slow_decode():
        started.set()
        release.wait(30)

    first: dict = {}

    def run_first():
        model = model_file(tmp_path)
        first["n"] = score_pairs_file(pairs, out, lambda: scripted_model(model, on_decode=slow_decode),
                                      model_arg=str(model), backend="llama.cpp", settings=CONFIG.to_dict(),
                                      progress=False)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(Rank1Error, match=rf"is being written by another run \(PID {os.getpid()}\)"):
            run_scripted(pairs, out)
    finally:
        release.set()
        thread.join(60)
    assert first["n"] == 6 and len(rows(out)) == 6  # one writer, each pair once
    assert not lock_path(out).exists()  # removed by its holder


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    pairs, out = pairs_file(tmp_path), tmp_path / "k.jsonl"
    lock_path(out).write_text("999999\n")  # a stale file: no process holds the lock
    assert run_scripted(pairs, out) == 6


def test_ray_refuses_a_locked_output_before_connecting(tmp_path):
    from rank1_local.integrations.ray_run_file import score_pairs_file_on_ray

    pairs, out = pairs_file(tmp_path), tmp_path / "r.jsonl"
    with OutputLock(out), pytest.raises(Rank1Error, match="is being written by another run"):
        score_pairs_file_on_ray(pairs, out, "scripted.gguf", CONFIG, address="127.0.0.1:1", progress=False)


# --- outputs where they must not go -------------------------------------------------------------------------------

def test_outputs_that_are_inputs_headers_or_not_files_are_refused(tmp_path):
    pairs = pairs_file(tmp_path)
    before = pairs.read_bytes()
    with pytest.raises(Rank1Error, match="is an input of this run"):
        run_scripted(pairs, pairs)
    with pytest.raises(Rank1Error, match="a run header's name"):
        run_scripted(pairs, tmp_path / "x.header.json")
    header_input = tmp_path / "run.header.json"
    header_input.write_bytes(before)
    with pytest.raises(Rank1Error, match="its header run.header.json would overwrite the input"):
        run_scripted(header_input, tmp_path / "run.jsonl")
    with pytest.raises(Rank1Error, match="not a regular file"):  # so is /dev/stdout on a terminal or a pipe
        run_scripted(pairs, Path("/dev/null"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(Rank1Error, match="not a regular file"):
        run_scripted(pairs, fifo)  # never opened: reading a FIFO with no writer would hang
    assert pairs.read_bytes() == before and header_input.read_bytes() == before
    assert not Path("/dev/null.header.json").exists()


def test_a_glob_of_inputs_that_matches_the_output_is_refused(tmp_path):
    from rank1_local.integrations.ray_run_file import pair_files

    pairs_file(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text("")
    with pytest.raises(Rank1Error, match="is an input of this run"):
        RunOutput(out, pair_files(tmp_path / "*.jsonl"))


def test_a_row_counts_as_done_only_when_it_is_a_result(tmp_path):
    pairs = pairs_file(tmp_path, 2)
    out = tmp_path / "o.jsonl"
    out.write_bytes(pairs.read_bytes())  # the pairs' own rows: ids, but no score
    with pytest.raises(Rank1Error, match=r"o.jsonl:1: not a result row"):
        run_scripted(pairs, out, force_resume=True)
    assert out.read_bytes() == pairs.read_bytes()
