"""Bundles: a self-contained folder with a GGUF model and its manifest, for offline and air-gapped use.

A bundle holds the GGUF file (every part of a split file) and ``rank1-bundle.json``: the format and its version, the
files with their size and SHA-256, the GGUF type, the model card (:mod:`rank1_local.core.cards`: ``rank1``,
``qwen3-reranker``), where it came from (hub repository and commit, or a local file), when it was made, the
rank1-local version, and the verification card when the export was verified. It is made by
``rank1-local pull`` or ``rank1-quantize gguf --bundle``, copied as a folder, and opened with
``--model BUNDLE_DIR``: every file is checked against the manifest (hashed once, then remembered while the file stays
the same file, see :mod:`rank1_local.models.file_digest`) before it is used, and the model runs under the manifest's
card unless ``--card`` names another (a manifest written before cards were recorded has none: the card is recognised
from the GGUF, as for a loose file). The GGUF is copied into the bundle (a hard link only when asked), so a change to
the source never reaches it.

A bundle is written into a hidden temporary folder and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import replace as replace_field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rank1_local.core.cards import CARDS, ModelCard, card_named, metadata_card, recognise_card
from rank1_local.core.errors import CorruptFileError, ModelNotFoundError, Rank1Error, UnsupportedModelError
from rank1_local.models.file_digest import file_digest, remember_digest
from rank1_local.models.gguf_file import LLAMA_FTYPES, check_gguf_file, read_gguf_layout
from rank1_local.runs.atomic import remove_stale, write_text_atomic
from rank1_local.runs.inputs import parse_json

logger = logging.getLogger(__name__)

MANIFEST = "rank1-bundle.json"
FORMAT = "rank1-bundle"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


@dataclass(frozen=True)
class BundleFile:
    name: str  # a plain file name inside the bundle folder
    size: int
    sha256: str


@dataclass(frozen=True)
class BundleSource:
    """Where the GGUF came from: a hub repository (``repo``, ``revision`` = commit, ``files`` in the repository),
    or a local ``path``. ``kind`` is ``gguf`` (a GGUF copied as it is) or ``export`` (exported from a checkpoint)."""

    kind: str = "gguf"
    repo: str | None = None
    revision: str | None = None
    files: tuple[str, ...] = ()
    path: str | None = None

    def describe(self) -> str:
        if self.repo:
            where = f"{self.repo}@{self.revision[:12]}" if self.revision else self.repo
        else:
            where = self.path or "?"
        return f"{where} (export)" if self.kind == "export" else where


@dataclass(frozen=True)
class Bundle:
    path: Path
    type: str
    files: tuple[BundleFile, ...]
    source: BundleSource
    created: str
    rank1_local_version: str
    verification: dict[str, Any] | None = field(default=None, compare=False)
    card: str | None = None  # the model card's name; None in a manifest written before cards were recorded

    @property
    def gguf(self) -> Path:
        """The GGUF file to load (the first part of a split file)."""
        return self.path / self.files[0].name

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def _manifest_json(bundle: Bundle) -> str:
    source = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(bundle.source).items()
              if v not in (None, ())}
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "type": bundle.type, "card": bundle.card,
            "files": [asdict(f) for f in bundle.files], "source": source, "created": bundle.created,
            "rank1_local_version": bundle.rank1_local_version, "verification": bundle.verification}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _parse_file(entry: Any) -> BundleFile:
    if not isinstance(entry, dict) or not _plain_name(entry.get("name")) or not isinstance(entry.get("size"), int) \
            or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
        raise ValueError(f"bad file entry {entry!r}")
    return BundleFile(entry["name"], entry["size"], entry["sha256"].lower())


def _optional_str(data: dict[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}{name} must be a string, got {type(value).__name__}")
    return value


def _parse_source(src: Any) -> BundleSource:
    if src is None:
        return BundleSource()
    if not isinstance(src, dict):
        raise ValueError(f"source must be an object, got {type(src).__name__}")
    files = src.get("files") or []
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError("source.files must be a list of file names")
    return BundleSource(kind=_optional_str(src, "kind", "source.") or "gguf", repo=_optional_str(src, "repo", "source."),
                        revision=_optional_str(src, "revision", "source."), files=tuple(files),
                        path=_optional_str(src, "path", "source."))


def read_bundle(path: Path) -> Bundle:
    """The manifest of the bundle in folder ``path`` (files are not checked: see :func:`verify_bundle`)."""
    path = Path(path).expanduser()
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise ModelNotFoundError(f"{path}: a folder, but not a rank1-local bundle (no {MANIFEST}); pass a .gguf file, "
                                 "or a bundle made by `rank1-local pull` or `rank1-quantize gguf --bundle`")
    try:
        data = parse_json(manifest.read_bytes(), str(manifest))
    except Rank1Error as exc:
        raise CorruptFileError(f"{exc}: not a valid bundle manifest") from None
    except OSError as exc:
        raise CorruptFileError(f"{manifest}: cannot be read ({exc.strerror or exc})") from None
    try:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version must be a version number from 1, got {json.dumps(version)[:20]}")
        if version > FORMAT_VERSION:
            raise UnsupportedModelError(f"{manifest}: bundle format version {version} is newer than this rank1-local "
                                        f"reads ({FORMAT_VERSION}); upgrade rank1-local")
        if not isinstance(data.get("files"), list) or not data["files"]:
            raise ValueError("files must be a non-empty list")
        files = tuple(_parse_file(f) for f in data["files"])
        names = [f.name for f in files]
        if len(set(names)) != len(names):
            raise ValueError(f"a file is listed twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
        if not isinstance(data.get("type"), str) or data["type"].upper() not in LLAMA_FTYPES:
            raise ValueError(f"type {json.dumps(data.get('type'))[:20]} is not a GGUF type "
                             f"({', '.join(LLAMA_FTYPES)})")
        source = _parse_source(data.get("source"))
        card = _optional_str(data, "card", "")
        verification = data.get("verification")
        return Bundle(path, data["type"], files, source, str(data.get("created", "")),
                      str(data.get("rank1_local_version", "")),
                      verification if isinstance(verification, dict) else None, card)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{manifest}: not a valid bundle manifest ({exc})") from None


def check_card(card: ModelCard, metadata: Mapping[str, Any], what: str) -> None:
    """Refuse ``card`` for a GGUF whose metadata plainly shows another (:func:`~rank1_local.core.cards.metadata_card`);
    ``what`` says where ``card`` was named."""
    shown = metadata_card(metadata)
    if shown is not None and shown is not card:
        raise Rank1Error(f"{what} the model card {card.name!r}, but the GGUF's metadata shows a {shown.name} (a "
                         f"{metadata.get('general.architecture')} with rank pooling)")


def bundle_card(bundle: Bundle, metadata: Mapping[str, Any]) -> ModelCard | None:
    """The model card the bundle's manifest records, for its GGUF's ``metadata``; None when it records none (a
    manifest from before cards were recorded). A card this rank1-local does not know, or one the metadata plainly
    contradicts, is an error naming both."""
    if bundle.card is None:
        return None
    manifest = bundle.path / MANIFEST
    card = CARDS.get(bundle.card)
    if card is None:
        raise UnsupportedModelError(f"{manifest}: the bundle's model card {bundle.card!r} is not one this rank1-local "
                                    f"knows ({', '.join(CARDS)}); upgrade rank1-local, or pass --card to choose one")
    try:
        check_card(card, metadata, f"{manifest}: the manifest names")
    except Rank1Error as exc:
        raise CorruptFileError(f"{exc}; pass --card to choose one, or make the bundle again") from None
    return card


def file_problem(bundle: Bundle, entry: BundleFile) -> str | None:
    """What is wrong with one of the bundle's files without reading it (missing, another size), or None."""
    path = bundle.path / entry.name
    if path.is_symlink() and not path.resolve().is_relative_to(bundle.path.resolve()):
        return (f"{path}: a link to {path.resolve()}, outside the bundle; a bundle holds its files itself (copy "
                "the file in, or make the bundle again)")
    if not path.is_file():
        return f"{path}: missing from the bundle (its manifest lists it); copy the bundle again"
    size = path.stat().st_size
    if size != entry.size:
        return (f"{path}: {size} bytes, the bundle manifest says {entry.size}: the file is truncated or changed; copy "
                "the bundle again")
    return None


def verify_bundle(bundle: Bundle, *, rehash: bool | None = None) -> None:
    """Check every file against the manifest: present, same size, same SHA-256 (from the digest memo unless the
    file changed, or always with ``rehash``). Raises CorruptFileError naming the file otherwise."""
    for entry in bundle.files:
        path = bundle.path / entry.name
        problem = file_problem(bundle, entry)
        if problem is not None:
            raise CorruptFileError(problem)
        try:
            digest = file_digest(path, rehash=rehash)
        except OSError as exc:
            raise CorruptFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        if digest != entry.sha256:
            raise CorruptFileError(f"{path}: SHA-256 {digest[:16]}… does not match the bundle manifest "
                                   f"({entry.sha256[:16]}…): the file is corrupt or changed; copy the bundle again")
    check_gguf_file(bundle.gguf)


def open_bundle(path: Path, gguf_type: str | None = None) -> Path:
    """The GGUF file of the bundle in ``path`` (first part of a split file), after checking every file against the
    manifest; ``gguf_type``, when given, must be the bundle's type."""
    bundle = read_bundle(path)
    if gguf_type is not None and gguf_type.upper() != bundle.type.upper():
        raise ModelNotFoundError(f"{bundle.path}: the bundle holds a {bundle.type} GGUF, not {gguf_type.upper()}")
    verify_bundle(bundle)
    logger.info("bundle %s: %s %s, %d file(s) match the manifest", bundle.path, bundle.type,
                bundle.source.describe(), len(bundle.files))
    return bundle.gguf


def _copy_hashing(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)
    return h.hexdigest()


def _place(src: Path, dst: Path, link: bool) -> str:
    """Put ``src`` at ``dst`` — a copy, or with ``link`` a hard link when on the same file system (then the bundle
    shares the source's bytes: a change to one is a change to the other) — and return its SHA-256 (read from the
    bytes placed)."""
    real = src.resolve()
    if link:
        try:
            os.link(real, dst)
        except OSError as exc:
            logger.info("cannot hard-link %s (%s): copying it", real, exc.strerror or exc)
        else:
            return file_digest(dst, rehash=True)
    return _copy_hashing(real, dst)


def _same_content(existing: Bundle, files: Sequence[Path], gguf_type: str, card: str) -> bool:
    if existing.card != card:
        return False
    if existing.type != gguf_type or [f.name for f in existing.files] != [p.name for p in files]:
        return False
    if any(f.size != p.stat().st_size for f, p in zip(existing.files, files)):
        return False
    if any(f.sha256 != file_digest(p.resolve()) for f, p in zip(existing.files, files)):
        return False
    try:
        verify_bundle(existing)
    except CorruptFileError:
        return False
    return True


def _check_target(out: Path, files: Sequence[Path], gguf_type: str, card: str, unrecorded: str,
                  replace: bool) -> Bundle | None:
    """The bundle already in ``out`` when it holds the same files for the same card (``unrecorded``: the card a
    manifest without one runs under); raises if ``out`` holds something else (another bundle may be replaced when
    ``replace``; a folder that is not a bundle never is)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise Rank1Error(f"{out}: exists and is not a folder; choose another bundle folder")
    if not is_bundle(out):
        if any(out.iterdir()):
            raise Rank1Error(f"{out}: a folder that is not empty and not a rank1-local bundle; choose another "
                             "bundle folder")
        return None
    try:
        existing = read_bundle(out)
    except CorruptFileError:
        existing = None
    if existing is not None and existing.card is None:
        existing = replace_field(existing, card=unrecorded)
    if existing is not None and _same_content(existing, files, gguf_type, card):
        return existing
    if not replace:
        what = f"{existing.type} from {existing.source.describe()}" if existing else "with an unreadable manifest"
        if existing is not None and existing.card != card:
            what += f", card {existing.card}"
        raise Rank1Error(f"{out} already holds a different bundle ({what}); choose another folder or pass --force "
                         "to replace it")
    return None


def _install(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing what is there (an empty folder or a bundle)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Remove the hidden folders that an earlier write of ``out`` left when its process was killed (the GGUF copies
    in a ``.partial`` folder can be gigabytes). Folders of processes still running are left alone."""
    remove_stale(out.parent, rf"\.{re.escape(out.name)}\.(?P<pid>\d+)\.(partial|old)", "bundle write")


def new_bundle_card(metadata: Mapping[str, Any], card: str | None, source: BundleSource, first: Path) -> str:
    """The model card a new bundle records: ``card`` when named (unless the GGUF's metadata plainly shows another),
    else the one the GGUF's metadata and names (the file's, the source repository's or folder's) show."""
    if card is not None:
        chosen = card_named(card)
        check_card(chosen, metadata, f"{first}: --card names")
        return chosen.name
    names = " ".join(n for n in (first.name, source.repo, Path(source.path).name if source.path else None) if n)
    return recognise_card(gguf_metadata=metadata, name=names).name


def write_bundle(out: Path, files: Sequence[Path], gguf_type: str, source: BundleSource, *,
                 verification: dict[str, Any] | None = None, expected_sha256: Sequence[str | None] = (),
                 replace: bool = False, link: bool = False, card: str | None = None) -> Bundle:
    """Make the bundle folder ``out`` from the GGUF ``files`` (every part of a split file, first part first), for the
    model card ``card`` (None: the one the first file's metadata and names show; see :func:`new_bundle_card`).

    Nothing is written when ``out`` already holds the same files for the same card. A different bundle there is
    refused unless ``replace``; a folder that is not a bundle is never touched. ``expected_sha256`` (per file, None when unknown),
    e.g. from the hub, is checked against the bytes placed in the bundle. The files are copied; with ``link`` they are
    hard links where the file system allows (no extra space, but the bundle changes with its source)."""
    from rank1_local.version import __version__

    out = Path(out).expanduser()
    files = [Path(f).expanduser() for f in files]
    if not files:
        raise Rank1Error("a bundle needs at least one GGUF file")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise Rank1Error(f"files with the same name cannot share a bundle: {', '.join(names)}")
    layouts = [read_gguf_layout(f) for f in files]  # a damaged GGUF is refused here, not sealed into a bundle
    card = new_bundle_card(layouts[0].metadata, card, source, files[0])
    unrecorded = recognise_card(gguf_metadata=layouts[0].metadata, name=files[0].name).name  # as a loose file
    gguf_type = gguf_type.upper()
    existing = _check_target(out, files, gguf_type, card, unrecorded, replace)
    if existing is not None:
        logger.info("%s already holds this bundle: nothing to do", out)
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = []
        for i, src in enumerate(files):
            logger.info("adding %s to the bundle", src.name)
            digest = _place(src, tmp / src.name, link)
            want = expected_sha256[i] if i < len(expected_sha256) else None
            if want and want.lower() != digest:
                raise CorruptFileError(f"{src}: SHA-256 {digest[:16]}… differs from the source's {want[:16]}…: the "
                                       "download is corrupt; delete it (hf cache delete) and pull again")
            entries.append(BundleFile(src.name, (tmp / src.name).stat().st_size, digest))
        bundle = Bundle(out, gguf_type, tuple(entries), source,
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), __version__, verification, card)
        write_text_atomic(tmp / MANIFEST, _manifest_json(bundle))
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in entries:
        remember_digest(out / entry.name, entry.sha256)
    logger.info("bundle %s: %s, card %s, %d file(s), %.1f MB", out, gguf_type, card, len(entries), bundle.size / 1e6)
    return bundle
