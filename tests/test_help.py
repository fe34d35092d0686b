"""Every command's ``--help``, rendered as a user sees it: plain words, every argument explained, ``-q`` everywhere,
and lines that wrap between words only (quick tier)."""

from __future__ import annotations

import argparse
import re

import pytest

from benchmarks.cli import build_parser as bench_parser
from quantize.cli import build_parser as quantize_parser
from rank1_local.cli.main import build_parser as local_parser

pytestmark = pytest.mark.quick


def commands(parser: argparse.ArgumentParser):
    """``parser`` and every subcommand's parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from commands(sub)


ALL = [p for build in (local_parser, quantize_parser, bench_parser) for p in commands(build())]


def rendered(parser: argparse.ArgumentParser, columns: int, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    return parser.format_help()


def test_every_command_is_rendered():
    progs = {p.prog for p in ALL}
    assert {"rank1-local rerank", "rank1-local cache stats", "rank1-quantize gguf", "rank1-bench compare",
            "rank1-bench study"} <= progs


@pytest.mark.parametrize("parser", ALL, ids=lambda p: p.prog)
def test_help_is_plain_and_complete(parser, monkeypatch):
    text = rendered(parser, 100, monkeypatch)
    assert "%%" not in text, f"{parser.prog}: a doubled % in its help"
    assert "``" not in text, f"{parser.prog}: reStructuredText literals in its help"
    assert re.search(r"^\s+-q, --quiet\b", text, re.M), f"{parser.prog} has no -q"
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{parser.prog} {choice.dest} has no help text"
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{parser.prog} {name} has no help text"


@pytest.mark.parametrize("parser", ALL, ids=lambda p: p.prog)
def test_help_wraps_between_words_only(parser, monkeypatch):
    """Narrow or wide, the help holds the same words: nothing (a path, a hyphenated name) is broken mid-word."""
    wide = rendered(parser, 400, monkeypatch).split()
    for columns in (60, 80):
        assert rendered(parser, columns, monkeypatch).split() == wide, f"{parser.prog} at {columns} columns"
