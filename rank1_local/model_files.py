"""Find the GGUF file for a model argument: a local file, or a hub repository.

For a hub id, a published GGUF of the wanted type is used if the repository has one; otherwise the
checkpoint is downloaded and exported with rank1-local's own exporter, once, into the HF cache
folder ``rank1-local-gguf``. Default type: Q8_0 up to 3B parameters, Q4_K_M above.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rank1_local.errors import ModelNotFoundError
from rank1_local.hub import is_hub_id
from rank1_local.llama_logits import check_gguf_file

logger = logging.getLogger(__name__)


def default_type(repo_id: str) -> str:
    match = re.search(r"(\d+(?:\.\d+)?)b\b", repo_id.lower())
    return "Q8_0" if match and float(match.group(1)) <= 3 else "Q4_K_M"


def _gguf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "rank1-local-gguf"


def resolve_gguf(model: str | Path, gguf_type: str | None = None) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        check_gguf_file(path)
        return path
    text = str(model)
    if not is_hub_id(text):
        raise ModelNotFoundError(f"{text}: no such GGUF file (and not a hub id of the form owner/name)")
    wanted = (gguf_type or default_type(text)).upper()
    exported = _gguf_cache_dir() / text.replace("/", "--") / f"{text.split('/')[-1]}-{wanted}.gguf"
    if exported.is_file():
        return exported
    published = _published_gguf(text, wanted)
    if published is not None:
        return published
    from quantize.gguf_export import export_gguf

    logger.info("%s has no %s GGUF; exporting it from the checkpoint", text, wanted)
    (result,) = export_gguf(text, exported.parent, wanted)
    return result.path


def _published_gguf(repo_id: str, wanted: str) -> Path | None:
    """A ``*<TYPE>*.gguf`` file published in ``repo_id``, downloaded (or from the cache)."""
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = list_repo_files(repo_id)
    except Exception as exc:  # offline: only the local cache can help
        logger.info("cannot list %s on the hub (%s); trying the local cache", repo_id, type(exc).__name__)
        return None
    matches = sorted(f for f in files if f.lower().endswith(".gguf") and wanted.lower() in f.lower())
    if not matches:
        return None
    return Path(hf_hub_download(repo_id, matches[0]))
