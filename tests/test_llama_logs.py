"""llama.cpp's log goes through Python logging at the right levels, and loading our own exports gives no warning
(the quick part feeds the router directly; the rest loads a fixture export)."""

from __future__ import annotations

import logging

import pytest

from rank1_local.backends.llama.logs import _LineJoiner

LOGGER = "llama.cpp"
# ggml_log_level in ggml.h
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5


@pytest.mark.quick
def test_levels_are_ggmls_and_fragments_are_joined(caplog):
    joiner = _LineJoiner()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        joiner.feed(INFO, "llama_model_loader: loaded meta data\n")
        joiner.feed(DEBUG, "a debug line\n")
        joiner.feed(WARN, "something odd: ")
        joiner.feed(CONT, "explained\n")
        joiner.feed(ERROR, "it failed\n")
        joiner.feed(WARN, "n_ctx_seq (37120) > n_ctx_train (32768) -- possible training context overflow\n")
        joiner.feed(WARN, "load: control-looking token: 128247 '</s>' was not control-type; this is probably a bug\n")
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert levels == [(logging.DEBUG, "llama_model_loader: loaded meta data"), (logging.DEBUG, "a debug line"),
                      (logging.WARNING, "something odd: explained"), (logging.ERROR, "it failed"),
                      (logging.DEBUG, levels[4][1]), (logging.DEBUG, levels[5][1])]


@pytest.mark.quick
def test_added_tokens_are_typed_as_llama_cpps_converter_types_them():
    import gguf

    from quantize.tokenizer_export import added_token_type

    assert added_token_type({"content": "<|im_end|>", "special": True}) == ("<|im_end|>", gguf.TokenType.CONTROL)
    # not marked special in Qwen2.5's tokenizer, but llama.cpp expects them to be control tokens
    for text in ("<|fim_prefix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>"):
        assert added_token_type({"content": text, "special": False}) == (text, gguf.TokenType.CONTROL)
    assert added_token_type({"content": "<think>", "special": False}) == ("<think>", gguf.TokenType.USER_DEFINED)


@pytest.mark.parametrize("name", ["behaving", "behaving-think"])
def test_loading_our_export_gives_no_warning(exported, caplog, name):
    from rank1_local import Rank1

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with Rank1(exported(name, "Q8_0"), n_ctx=4096, max_think_tokens=1024, parallel=8, threads=2) as model:
            model.predict([("q", "a passage")])
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert warnings == []  # no "control-looking token", no "possible training context overflow" at our defaults


@pytest.mark.quick
def test_a_line_logged_while_a_progress_bar_is_shown_goes_above_it(capsys):
    """The CLIs' log handler writes through tqdm: the bar is cleared, the line printed on its own, the bar drawn again
    (a plain stream handler would print the line straight after the bar's text)."""
    import sys

    from tqdm import tqdm

    from rank1_local.cli.support import ProgressAwareHandler

    handler = ProgressAwareHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    with tqdm(total=4, desc="scoring", file=sys.stderr, mininterval=0) as bar:
        bar.update(1)
        handler.emit(logging.makeLogRecord({"name": "x", "levelno": logging.INFO, "levelname": "INFO",
                                            "msg": "a line"}))
        bar.update(1)
    err = capsys.readouterr().err
    before = err[:err.index("INFO x: a line")]
    assert before.endswith("\r") and "scoring" in before  # the bar was cleared back to column 0 first
    assert "INFO x: a line\n" in err and "scoring" in err[err.index("INFO x: a line"):]  # and drawn again below


def test_quiet_export_through_llama_cpps_quantizer_prints_nothing(fixture_dir, tmp_path):
    """`rank1-quantize gguf … --types Q4_K_M -q` goes through llama.cpp's quantizer: nothing on stderr at all (it printed
    68 lines of llama_model_loader output); without -q, our lines and bars only, named after the files made."""
    import subprocess
    import sys

    source = str(fixture_dir("behaving"))
    command = [sys.executable, "-m", "quantize.cli", "gguf", source, "--out", str(tmp_path), "--types", "Q4_K_M"]
    quiet = subprocess.run(command + ["-q"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
    for made in tmp_path.glob("*.gguf"):
        made.unlink()
    loud = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0
    for noise in ("llama_model_loader", "llama_model_quantize", "Little Endian", ".tmp", "w/s", "rank1-export"):
        assert noise not in loud.stderr, (noise, loud.stderr[-2000:])
    assert "with llama.cpp's quantizer" in loud.stderr


def test_the_studys_tokenizer_makes_no_context(exported, caplog):
    """rank1-bench's tokenizer for a GGUF reads the vocabulary alone: no llama.cpp context, so no `n_ctx_seq (512) >
    n_ctx_train (0)` warning; its ids are the text's own (no BOS)."""
    from llama_cpp import Llama

    from benchmarks.cli import load_tokenizer
    from rank1_local.backends.llama.engine import llama_cpp_module

    llama_cpp_module()  # llama.cpp's log routed to Python logging, as in the study's process
    path = exported("behaving", "Q8_0")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        tokenize = load_tokenizer(str(path))
        ids = tokenize("The query asks about apple (fruit).\n</think>")
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if "llama_context" in r.getMessage()]
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert ids == llm.tokenize("The query asks about apple (fruit).\n</think>".encode(), add_bos=False,
                                   special=True)
    finally:
        llm.close()
