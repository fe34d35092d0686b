"""Optional dependencies: import them on demand, and say which extra to install when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from rank1_local.core.errors import Rank1Error


class MissingExtraError(Rank1Error):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` saying ``pip install 'rank1-local[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise MissingExtraError(f"{purpose} needs {missing}, which is not installed: "
                                f"pip install 'rank1-local[{extra}]'") from None
