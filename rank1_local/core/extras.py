"""Optional dependencies: import them on demand, and say which extra to install when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from rank1_local.core.errors import Rank1Error


class MissingExtraError(Rank1Error):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


# PyPI's default torch wheel for Linux is the CUDA build (several GB of CUDA libraries); a CPU box wants this one
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def install_hint(extra: str, missing: str) -> str:
    """The pip command(s) that install ``extra`` (torch first from the CPU index where torch is what is missing)."""
    hint = f"pip install 'rank1-local[{extra}]'"
    if missing.split(".")[0] == "torch":
        hint = (f"pip install torch --index-url {TORCH_CPU_INDEX} (the CPU build; on a CUDA machine pip install "
                f"torch), then {hint}")
    return hint


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` saying ``pip install 'rank1-local[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise MissingExtraError(f"{purpose} needs {missing}, which is not installed: "
                                f"{install_hint(extra, missing)}") from None
