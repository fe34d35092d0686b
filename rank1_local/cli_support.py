"""What both command-line tools share: logging set-up and turning user errors into plain messages."""

from __future__ import annotations

import argparse
import logging
import sys

from rank1_local.errors import Rank1Error


def run_command(args: argparse.Namespace, interrupted: str) -> int:
    """Run ``args.func(args)``; a :class:`Rank1Error` prints ``error: …`` (exit 2), never a traceback."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Rank1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
