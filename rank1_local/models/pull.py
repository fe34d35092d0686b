"""``rank1-local pull``: put a GGUF into a bundle folder that runs anywhere without network.

The model is a hub repository that publishes GGUF files (the file of exactly the wanted type, every part of a split
file; offline, from the local Hugging Face cache) or a local .gguf file (with the verification card written beside it
by ``rank1-quantize gguf --verify``, if any). A checkpoint without a GGUF of that type is not exported here: the
runtime never exports, and the error gives the toolchain command that writes the bundle.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rank1_local.core.cards import card_named
from rank1_local.core.errors import ModelNotFoundError
from rank1_local.models.bundle import Bundle, BundleSource, write_bundle
from rank1_local.models.gguf_file import read_gguf_layout
from rank1_local.models.hub import is_hub_id, missing_model
from rank1_local.models.model_files import check_type, default_type, find_published_gguf, gguf_file_type, split_name
from rank1_local.runs.user_dirs import default_bundles_dir

logger = logging.getLogger(__name__)

VERIFY_CARD_SUFFIX = ".verify.json"  # written beside an export by ``rank1-quantize gguf --verify``


def pull(model: str, gguf_type: str | None = None, out: Path | None = None, *, replace: bool = False,
         link: bool = False, card: str | None = None) -> Bundle:
    """Write the bundle of ``model`` (hub id or local .gguf file) into ``out`` (default: the bundles folder,
    ``<name>-<TYPE>``) and return it. The GGUF's header and tensor table are checked first (a damaged file is
    refused); it is copied into the bundle, or hard-linked with ``link``. The manifest records the model card:
    ``card``, or the one the GGUF's metadata and names show."""
    path = Path(model).expanduser()
    if path.is_dir():
        raise ModelNotFoundError(f"{path}: a folder; pull takes a hub id or a .gguf file (a bundle folder is "
                                 "moved by copying it as it is)")
    if card is not None:
        card_named(card)  # an unknown card is refused before anything is fetched
    if path.exists():
        return _pull_file(path, gguf_type, out, replace, link, card)
    if not is_hub_id(model):
        raise ModelNotFoundError(missing_model(model, "file"))
    wanted = check_type(gguf_type or default_type(model))
    out = Path(out).expanduser() if out is not None else default_bundles_dir() / f"{model.split('/')[-1]}-{wanted}"
    published = find_published_gguf(model, wanted, bundle_hint=out)
    source = BundleSource(repo=model, revision=published.revision, files=tuple(published.files))
    return write_bundle(out, published.paths, wanted, source, expected_sha256=published.sha256, replace=replace,
                        link=link, card=card)


def split_parts(path: Path) -> list[Path]:
    """Every part of a split GGUF given by its first part (``…-00001-of-000NN.gguf``), or ``[path]``."""
    split = split_name(path.name)
    if split is None:
        return [path]
    if split.part != 1:
        raise ModelNotFoundError(f"{path}: part {split.part} of a split GGUF; pass the first part "
                                 f"({split.part_name(1)})")
    total = split.total
    parts = [path.with_name(split.part_name(i)) for i in range(1, total + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"{path}: a split GGUF of {total} parts, but {', '.join(missing)} "
                                 f"{'is' if len(missing) == 1 else 'are'} missing beside it")
    return parts


def _verification_card(path: Path) -> dict[str, Any] | None:
    card = path.with_name(path.name + VERIFY_CARD_SUFFIX)
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        logger.warning("ignoring the unreadable verification card %s (%s)", card, exc)
        return None
    return data if isinstance(data, dict) else None


def _pull_file(path: Path, gguf_type: str | None, out: Path | None, replace: bool, link: bool,
               card: str | None) -> Bundle:
    parts = split_parts(path)
    layouts = [read_gguf_layout(part) for part in parts]  # a damaged file is refused before anything is written
    declared = layouts[0].file_type or gguf_file_type(path.name)
    if gguf_type is not None and declared is not None and check_type(gguf_type) != declared:
        raise ModelNotFoundError(f"{path} is a {declared} GGUF, not {gguf_type.upper()}")
    if gguf_type is None and declared is None:
        raise ModelNotFoundError(f"{path}: cannot tell its GGUF type (no general.file_type, none in the name); "
                                 "pass --gguf-type")
    wanted = check_type(gguf_type) if gguf_type is not None else str(declared)
    split = split_name(path.name)
    name = split.base if split else path.name[:-5] if path.name.lower().endswith(".gguf") else path.stem
    if gguf_file_type(name + ".gguf") is None:
        name = f"{name}-{wanted}"
    out = Path(out).expanduser() if out is not None else default_bundles_dir() / name
    source = BundleSource(path=str(path.resolve()), files=tuple(p.name for p in parts))
    verification = _verification_card(path)
    if verification is not None:
        logger.info("including the verification card %s%s", path.name, VERIFY_CARD_SUFFIX)
    return write_bundle(out, parts, wanted, source, verification=verification, replace=replace, link=link, card=card)
