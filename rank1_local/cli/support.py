"""What both command-line tools share: logging set-up and turning user errors into plain messages."""

from __future__ import annotations

import argparse
import logging
import sys

from rank1_local.core.errors import Rank1Error


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


def configure_logging(quiet: bool) -> None:
    """Log to stderr at INFO (WARNING when ``quiet``); a message a library printed with its own handler is not printed
    a second time by ours."""
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if handler not in before:
            handler.addFilter(lambda record: not printed_on_the_way(record))


def run_command(args: argparse.Namespace, interrupted: str) -> int:
    """Run ``args.func(args)``; a :class:`Rank1Error` prints ``error: …`` (exit 2), never a traceback."""
    configure_logging(args.quiet)
    try:
        return args.func(args)
    except Rank1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
