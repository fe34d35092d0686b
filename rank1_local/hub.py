"""Resolve a model argument: a local path, or a Hugging Face hub id fetched with huggingface-hub.

Works offline from the HF cache (``HF_HUB_OFFLINE=1`` is honoured by huggingface-hub itself); when
the hub cannot be reached and nothing is cached, the error says so and shows the local-path route.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rank1_local.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not Path(model).expanduser().exists()


def download_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the HF cache) the files of ``repo_id`` matching ``allow_patterns``."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"huggingface-hub is required to download {repo_id}: {exc}") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such repository on the Hugging Face hub") from None
    except Exception as exc:  # network down, offline mode without cache, proxy errors …
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"could not get {repo_id} from the Hugging Face hub and it is not in the local cache "
            f"({type(exc).__name__}: {reason[:200]}).\n"
            f"On a connected machine run `hf download {repo_id}` (then copy ~/.cache/huggingface), "
            f"or pass a local folder or file instead of the hub id.") from None


def resolve_local_or_hub(model: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local path as given, or the local snapshot folder of a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if is_hub_id(text):
        logger.info("resolving %s on the Hugging Face hub", text)
        return download_snapshot(text, allow_patterns)
    raise ModelNotFoundError(f"{text}: no such file or folder (and not a hub id of the form owner/name)")


def hub_is_offline() -> bool:
    """True when the user asked huggingface-hub to stay offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
