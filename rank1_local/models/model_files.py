"""Find the GGUF file for a model argument: a local file, a bundle folder, or a GGUF published in a hub repository.

A hub repository is searched for a file of exactly the wanted type (``F16`` is not ``BF16``; split files
``-00001-of-000NN.gguf`` are fetched whole). Offline (``HF_HUB_OFFLINE=1``, or the hub unreachable: checked at once,
see :func:`rank1_local.models.hub.check_hub`), the local Hugging Face cache is searched instead. A bundle folder
(:mod:`rank1_local.models.bundle`) is checked against its manifest and needs no network at all.
The runtime never exports: a checkpoint without a published GGUF is exported once with ``rank1-quantize gguf``
(the toolchain), and the error says so. Default type: Q8_0 up to 3B parameters, Q4_K_M above.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from rank1_local.core.errors import ModelNotFoundError
from rank1_local.models.bundle import open_bundle
from rank1_local.models.gguf_file import LLAMA_FTYPES, check_gguf_file
from rank1_local.models.hub import (
    FIXTURE_HINT,
    HubAccess,
    cached_snapshot,
    check_hub,
    hub_cache_dir,
    is_hub_id,
    missing_model,
)

logger = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(?P<base>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class SplitName:
    """A part of a split GGUF: ``{base}-{part:05d}-of-{total:05d}.gguf``."""

    base: str
    part: int
    total: int

    def part_name(self, part: int) -> str:
        return f"{self.base}-{part:05d}-of-{self.total:05d}.gguf"


def split_name(name: str) -> SplitName | None:
    """The split-file parts of a file name or path (``rank1-32b-Q4_K_M-00001-of-00003.gguf``), None if not split."""
    match = _SPLIT.match(name)
    return SplitName(match["base"], int(match["part"]), int(match["total"])) if match else None


def default_type(repo_id: str) -> str:
    match = re.search(r"(\d+(?:\.\d+)?)b\b", repo_id.lower())
    return "Q8_0" if match and float(match.group(1)) <= 3 else "Q4_K_M"


def gguf_file_type(name: str) -> str | None:
    """The GGUF type a published file name carries (``rank1-7b-Q4_K_M.gguf``, ``rank1-7b.q8_0.gguf``,
    ``rank1-32b-Q4_K_M-00001-of-00003.gguf`` …), upper-cased; None if it names no type we know."""
    stem = Path(name).name
    if not stem.lower().endswith(".gguf"):
        return None
    split = split_name(stem)
    stem = split.base if split else stem[:-5]
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
    split = split_name(first)
    if split is None:
        return [first]
    parts = [f for f in matches if (other := split_name(f)) is not None and other.base == split.base]
    if len(parts) != split.total:
        raise ModelNotFoundError(f"{first}: a split GGUF of {split.total} parts, but {len(parts)} are published")
    return parts


def resolve_gguf(model: str | Path, gguf_type: str | None = None) -> Path:
    """A local .gguf file as given, the GGUF of a bundle folder (checked against its manifest), or a published GGUF
    of ``gguf_type`` from a hub repository."""
    path = Path(model).expanduser()
    if path.is_dir():
        return open_bundle(path, gguf_type)
    if path.exists():
        check_gguf_file(path)
        return path
    text = str(model)
    if not is_hub_id(text):
        raise ModelNotFoundError(missing_model(text, "file or bundle folder"))
    wanted = (gguf_type or default_type(text)).upper()
    return find_published_gguf(text, wanted).paths[0]


@dataclass(frozen=True)
class PublishedGguf:
    """A GGUF of one type published in a hub repository, fetched or found in the local cache."""

    repo_id: str
    revision: str | None  # the commit
    type: str
    files: list[str]  # names in the repository, first part first
    paths: list[Path]  # the local copies, same order
    sha256: list[str | None]  # as the hub lists them (LFS), None when unknown (offline)


def check_type(gguf_type: str) -> str:
    """``gguf_type`` upper-cased, if llama.cpp knows it."""
    wanted = gguf_type.upper()
    if wanted not in LLAMA_FTYPES:
        raise ModelNotFoundError(f"unknown GGUF type {gguf_type!r}; known: {', '.join(LLAMA_FTYPES)}")
    return wanted


def bundle_name(repo_id: str, wanted: str) -> str:
    """The bundle folder named after a repository and type: ``rank1-0.5b-Q8_0`` (a name that ends in the type
    already keeps it once)."""
    name = repo_id.rstrip("/").split("/")[-1]
    return name if name.upper().endswith(wanted.upper()) else f"{name}-{wanted}"


def export_hint(repo_id: str, wanted: str, bundle: Path | None = None) -> str:
    """The toolchain command that makes the missing GGUF (into a bundle folder when ``bundle`` is given)."""
    name = repo_id.split("/")[-1]
    if bundle is not None:
        return (f"export it once with the toolchain (the runtime never exports): rank1-quantize gguf {repo_id} "
                f"--out models --types {wanted} --bundle {bundle}")
    return (f"export it once with the toolchain: rank1-quantize gguf {repo_id} --out models --types {wanted}, "
            f"then pass models/{name}-{wanted}.gguf")


def find_published_gguf(repo_id: str, wanted: str, *, bundle_hint: Path | None = None) -> PublishedGguf:
    """The GGUF file(s) of type ``wanted`` in hub repository ``repo_id``: downloaded (into the Hugging Face cache)
    when the hub can be reached, else from the local cache. ``bundle_hint`` only changes the error's export command."""
    access = check_hub()
    if access.online:
        try:
            return _from_hub(repo_id, wanted, bundle_hint)
        except _ListingFailed as exc:  # the hub answered the probe but not this request: the cache may still help
            logger.warning("cannot list %s on the hub (%s); looking in the local cache", repo_id, exc)
            access = HubAccess(False, f"listing {repo_id} failed: {exc}")
    return _from_cache(repo_id, wanted, access, bundle_hint)


class _ListingFailed(Exception):
    """The hub could not list a repository (network error, server error)."""


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _from_hub(repo_id: str, wanted: str, bundle_hint: Path | None) -> PublishedGguf:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such repository on the Hugging Face hub (or a private one: log in "
                                 "with hf auth login)") from None
    except Exception as exc:
        raise _ListingFailed(_reason(exc)) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = select_gguf(list(siblings), wanted)
    if not chosen:
        types = sorted({t for t in map(gguf_file_type, siblings) if t})
        have = f"it has {', '.join(types)}" if types else "it publishes no GGUF files"
        raise ModelNotFoundError(f"{repo_id} has no {wanted} GGUF ({have}); " +
                                 export_hint(repo_id, wanted, bundle_hint))
    paths = []
    for name in chosen:
        try:
            paths.append(Path(hf_hub_download(repo_id, name, revision=info.sha)))
        except Exception as exc:
            raise ModelNotFoundError(f"downloading {name} from {repo_id} failed ({_reason(exc)})") from None
    sha256 = [getattr(getattr(siblings[n], "lfs", None), "sha256", None) for n in chosen]
    return PublishedGguf(repo_id, info.sha, wanted, chosen, paths, sha256)


def _from_cache(repo_id: str, wanted: str, access: HubAccess, bundle_hint: Path | None) -> PublishedGguf:
    snapshot = cached_snapshot(repo_id)
    if snapshot is None:
        name = bundle_name(repo_id, wanted)
        publishes = (f"if it publishes GGUF files: `rank1-local pull {repo_id} --gguf-type {wanted}` (or `hf download "
                     f"{repo_id} --include '*{wanted}*.gguf'` and copy ~/.cache/huggingface)")
        checkpoint = (f"if it is a checkpoint (safetensors): `rank1-quantize gguf {repo_id} --out models --types "
                      f"{wanted} --bundle {name}`")
        routes = [publishes, checkpoint] if "gguf" in repo_id.lower() else [checkpoint, publishes]
        raise ModelNotFoundError(
            f"{repo_id}: no such file or folder here, and as a hub id it is not in the local cache ({hub_cache_dir()}) "
            f"and the hub cannot be used ({access.reason}).\nOn a connected machine make a bundle folder and copy it "
            f"here: {'; or, '.join(routes)}. Or pass a local .gguf file or bundle folder instead of the hub id. "
            f"{FIXTURE_HINT}")
    local = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf") if p.is_file())
    chosen = select_gguf(local, wanted)
    if not chosen:
        types = sorted({t for t in map(gguf_file_type, local) if t})
        have = f"it holds {', '.join(types)}" if types else "it holds no GGUF files"
        raise ModelNotFoundError(
            f"the cached copy of {repo_id} ({snapshot}) holds no {wanted} GGUF ({have}) and the hub cannot be used "
            f"({access.reason}); download it on a connected machine (`hf download {repo_id} --include "
            f"'*{wanted}*.gguf'`), or if it publishes none, " + export_hint(repo_id, wanted, bundle_hint))
    logger.info("%s: using the cached %s", repo_id, ", ".join(chosen))
    return PublishedGguf(repo_id, snapshot.name, wanted, chosen, [snapshot / c for c in chosen], [None] * len(chosen))
