"""What models this machine holds, without network: bundles, loose GGUF files, and GGUFs in the Hugging Face cache.

Bundles are listed from their manifests, and each file is checked to be there with the size the manifest gives (a
truncated or missing file shows as the bundle's problem). With ``verify``, every bundle file is hashed too (as when a
bundle is opened); otherwise nothing is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rank1_local.core.errors import ModelNotFoundError, Rank1Error
from rank1_local.models.bundle import file_problem, is_bundle, read_bundle, verify_bundle
from rank1_local.models.model_files import gguf_file_type, split_name
from rank1_local.runs.user_dirs import default_bundles_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    kind: str  # "bundle", "file" (a .gguf in a listed folder) or "hf-cache"
    name: str
    type: str | None
    size: int  # bytes, every part of a split file
    source: str
    path: Path
    problem: str | None = None  # e.g. an unreadable bundle manifest
    card: str | None = None  # a bundle's model card, as its manifest records it (None: not recorded, or not a bundle)


def _bundle_row(folder: Path, verify: bool = False) -> LocalModel:
    try:
        bundle = read_bundle(folder)
        problem = next((p for p in (file_problem(bundle, f) for f in bundle.files) if p), None)
        if problem is None and verify:
            verify_bundle(bundle, rehash=True)
    except Rank1Error as exc:
        return LocalModel("bundle", folder.name, None, 0, "?", folder, problem=str(exc))
    except OSError as exc:
        return LocalModel("bundle", folder.name, None, 0, "?", folder, problem=f"cannot be read ({exc})")
    return LocalModel("bundle", folder.name, bundle.type, bundle.size, bundle.source.describe(), folder,
                      problem=problem, card=bundle.card)


def _gguf_groups(paths: list[Path]) -> list[tuple[Path, int]]:
    """(file to load, total bytes) per model among ``paths``: a split file counts once, by its first part."""
    rows = []
    for path in sorted(paths):
        split = split_name(path.name)
        if split is None:
            rows.append((path, path.stat().st_size))
        elif split.part == 1:
            parts = [p for p in paths if (other := split_name(p.name)) is not None and other.base == split.base]
            rows.append((path, sum(p.stat().st_size for p in parts)))
    return rows


def folder_models(folder: Path, verify: bool = False) -> list[LocalModel]:
    """The bundle ``folder`` is, or the bundles and .gguf files directly inside it."""
    if is_bundle(folder):
        return [_bundle_row(folder, verify)]
    rows = [_bundle_row(sub, verify) for sub in sorted(folder.iterdir())
            if not sub.name.startswith(".") and is_bundle(sub)]
    ggufs = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".gguf")]
    rows += [LocalModel("file", path.name, gguf_file_type(path.name), size, "local file", path)
             for path, size in _gguf_groups(ggufs)]
    return rows


def cached_ggufs() -> list[LocalModel]:
    """GGUF files in the local Hugging Face cache (every cached revision of every model repository)."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    except (OSError, ValueError) as exc:
        logger.warning("cannot read the Hugging Face cache (%s)", exc)
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            paths = [Path(f.file_path) for f in rev.files if f.file_name.lower().endswith(".gguf")]
            refs = f" ({', '.join(sorted(rev.refs))})" if rev.refs else ""
            rows += [LocalModel("hf-cache", path.name, gguf_file_type(path.name), size,
                                f"{repo.repo_id}@{rev.commit_hash[:12]}{refs}", path)
                     for path, size in _gguf_groups(paths)]
    return rows


def local_models(folders: list[Path] | None = None, *, hub_cache: bool = True, verify: bool = False) -> list[LocalModel]:
    """Bundles in the default bundles folder and in ``folders`` (bundles themselves, or folders holding bundles and
    .gguf files), then GGUFs in the Hugging Face cache. ``verify``: hash every bundle file against its manifest."""
    rows: list[LocalModel] = []
    default = default_bundles_dir()
    if default.is_dir():
        rows += folder_models(default, verify)
    for folder in folders or []:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder}: no such folder")
        if default.is_dir() and folder.resolve() == default.resolve():
            continue
        rows += folder_models(folder, verify)
    if hub_cache:
        rows += cached_ggufs()
    return rows
