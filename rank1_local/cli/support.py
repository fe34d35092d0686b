"""What the command-line tools share: logging set-up, help formatting, the ``-q``/``--version`` flags, and turning
user errors into plain messages."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap

from rank1_local.core.errors import Rank1Error


def plain_text(doc: str | None) -> str:
    """A docstring as help text: its reStructuredText literals (````rank1-local````) as plain words."""
    return re.sub(r"``([^`]+)``", r"\1", doc or "")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help texts end with their default, unless the text already names it or there is none worth showing; lines
    wrap between words only (argparse would also break a path at its hyphens, or a long one anywhere)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_long_words=False,
                             break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or \
                not action.option_strings or isinstance(action, argparse._VersionAction):
            return text
        return text + " (default: %(default)s)"


class RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's and epilog's line breaks (lists, tables)."""


def add_common_flags(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    """``-q``/``--quiet`` (before or after the subcommand: a subcommand's parser leaves it unset unless given)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if sub else False,
                        help="warnings and errors only: no progress bars, no INFO lines")


def add_subcommand(sub: argparse._SubParsersAction, name: str, *, help: str, **kw: object) -> argparse.ArgumentParser:
    """A subcommand's parser: its help is also its description, defaults are shown, and it takes ``-q`` too."""
    kw.setdefault("formatter_class", HelpFormatter)
    kw.setdefault("description", help)
    p = sub.add_parser(name, help=help, **kw)  # type: ignore[arg-type]
    add_common_flags(p, sub=True)
    return p


def add_version(parser: argparse.ArgumentParser) -> None:
    from rank1_local.version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def printed_on_the_way(record: logging.LogRecord) -> bool:
    """Whether a handler between the record's logger and the root (a library's own, as huggingface-hub adds to its
    logger at import) has printed the record already."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None and logger is not logging.getLogger():
        if any(record.levelno >= h.level for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


class ProgressAwareHandler(logging.Handler):
    """Writes log lines to stderr with ``tqdm.write``: a line logged while a progress bar is shown goes above the bar,
    which is drawn again below it, instead of landing in the middle of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


# libraries whose INFO lines narrate their own work (gguf-py: "This GGUF file is for Little Endian only", the files it
# writes): our own lines and progress bars already say what is being made
QUIET_LIBRARIES = ("gguf",)


def configure_logging(quiet: bool) -> None:
    """Log to stderr at INFO (WARNING when ``quiet``), above any progress bar; a message a library printed with its own
    handler is not printed a second time by ours."""
    root = logging.getLogger()
    before = list(root.handlers)
    handler = ProgressAwareHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])
    for handler in root.handlers:
        if handler not in before:
            handler.addFilter(lambda record: not printed_on_the_way(record))
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_command(args: argparse.Namespace, interrupted: str) -> int:
    """Run ``args.func(args)``; a :class:`Rank1Error` prints ``error: …`` (exit 2), never a traceback. Ctrl-C prints
    ``interrupted`` (or the command's own ``args.interrupted``) and exits 130, or 0 where the command says that is its
    normal end (``args.interrupt_code``, e.g. a server)."""
    configure_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except Rank1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(getattr(args, "interrupted", interrupted), file=sys.stderr)
        return int(getattr(args, "interrupt_code", 130))
