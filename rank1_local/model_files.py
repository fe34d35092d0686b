"""Find the GGUF file for a model argument: a local file, or a GGUF published in a hub repository.

A hub repository is searched for a file of exactly the wanted type (``F16`` is not ``BF16``; split files
``-00001-of-000NN.gguf`` are fetched whole). Offline, the local Hugging Face cache is searched instead.
The runtime never exports: a checkpoint without a published GGUF is exported once with ``rank1-quantize gguf``
(the toolchain), and the error says so. Default type: Q8_0 up to 3B parameters, Q4_K_M above.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rank1_local.errors import ModelNotFoundError
from rank1_local.gguf_file import LLAMA_FTYPES, check_gguf_file
from rank1_local.hub import hub_is_offline, is_hub_id

logger = logging.getLogger(__name__)

_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$")


def default_type(repo_id: str) -> str:
    match = re.search(r"(\d+(?:\.\d+)?)b\b", repo_id.lower())
    return "Q8_0" if match and float(match.group(1)) <= 3 else "Q4_K_M"


def gguf_file_type(name: str) -> str | None:
    """The GGUF type a published file name carries (``rank1-7b-Q4_K_M.gguf``, ``rank1-7b.q8_0.gguf``,
    ``rank1-32b-Q4_K_M-00001-of-00003.gguf`` …), upper-cased; None if it names no type we know."""
    stem = Path(name).name
    if not stem.lower().endswith(".gguf"):
        return None
    stem = _SPLIT.sub("", stem[:-5])
    parts = [p.upper() for p in re.split(r"[-.]", stem) if p]
    found = [p for p in parts if p in LLAMA_FTYPES]
    return found[-1] if found else None


def select_gguf(files: list[str], wanted: str) -> list[str]:
    """The file(s) of type ``wanted`` among a repository's files: one file, or every part of a split file
    (first part first). Empty when there is none."""
    matches = sorted(f for f in files if gguf_file_type(f) == wanted.upper())
    if not matches:
        return []
    first = matches[0]
    split = _SPLIT.search(first[:-5])
    if split is None:
        return [first]
    base = first[:-5][:split.start()]
    parts = [f for f in matches if f[:-5].startswith(base) and _SPLIT.search(f[:-5])]
    total = int(split.group(2))
    if len(parts) != total:
        raise ModelNotFoundError(f"{first}: a split GGUF of {total} parts, but {len(parts)} are published")
    return parts


def resolve_gguf(model: str | Path, gguf_type: str | None = None) -> Path:
    """A local .gguf file as given, or a published GGUF of ``gguf_type`` from a hub repository."""
    path = Path(model).expanduser()
    if path.exists():
        check_gguf_file(path)
        return path
    text = str(model)
    if not is_hub_id(text):
        raise ModelNotFoundError(f"{text}: no such GGUF file (and not a hub id of the form owner/name)")
    wanted = (gguf_type or default_type(text)).upper()
    return _published_gguf(text, wanted)


def _export_hint(repo_id: str, wanted: str) -> str:
    name = repo_id.split("/")[-1]
    return (f"export it once with the toolchain: rank1-quantize gguf {repo_id} --out models --types {wanted}, "
            f"then pass models/{name}-{wanted}.gguf")


def _published_gguf(repo_id: str, wanted: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    files: list[str] | None = None
    if not hub_is_offline():
        try:
            files = list_repo_files(repo_id)
        except Exception as exc:  # unreachable hub, unknown repo: the local cache may still help
            logger.info("cannot list %s on the hub (%s); looking in the local cache", repo_id, type(exc).__name__)
    if files is None:
        try:
            snapshot = Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:
            raise ModelNotFoundError(
                f"could not reach the Hugging Face hub for {repo_id} and it is not in the local cache.\n"
                f"On a connected machine run `hf download {repo_id} --include '*{wanted}*.gguf'` (then copy "
                f"~/.cache/huggingface), or pass a local .gguf file instead of the hub id.") from None
        local = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
        chosen = select_gguf(local, wanted)
        if not chosen:
            raise ModelNotFoundError(f"the cached copy of {repo_id} holds no {wanted} GGUF; " + _export_hint(repo_id,
                                                                                                            wanted))
        return snapshot / chosen[0]
    chosen = select_gguf(files, wanted)
    if not chosen:
        types = sorted({t for t in map(gguf_file_type, files) if t})
        have = f"it has {', '.join(types)}" if types else "it publishes no GGUF files"
        raise ModelNotFoundError(f"{repo_id} has no {wanted} GGUF ({have}); " + _export_hint(repo_id, wanted))
    paths = [Path(hf_hub_download(repo_id, f)) for f in chosen]
    return paths[0]
