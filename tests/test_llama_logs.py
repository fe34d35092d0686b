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
