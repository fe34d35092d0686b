"""``rank1-quantize gguf --bundle``: an export as a bundle folder (see :mod:`rank1_local.models.bundle`), with its
verification card when the export was verified."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from quantize.gguf_export import ExportResult
from quantize.verify import VerifyReport
from rank1_local.core.errors import Rank1Error
from rank1_local.models.bundle import Bundle, BundleSource, is_bundle, write_bundle
from rank1_local.models.hub import snapshot_revision


def bundle_dir(bundle: Path, result: ExportResult, n_types: int) -> Path:
    """``bundle`` itself for a single type; for several, one bundle per type inside it, named like the export."""
    return bundle if n_types == 1 else bundle / result.path.name.removesuffix(".gguf")


def check_bundle_folder(bundle: Path, n_types: int) -> None:
    """Fail before exporting when the bundle could not be written: ``bundle`` (for one type) is a file or a folder
    holding something other than a bundle."""
    bundle = bundle.expanduser()
    if bundle.exists() and not bundle.is_dir():
        raise Rank1Error(f"--bundle {bundle}: exists and is not a folder")
    if n_types == 1 and bundle.is_dir() and not is_bundle(bundle) and any(bundle.iterdir()):
        raise Rank1Error(f"--bundle {bundle}: a folder that is not empty and not a rank1-local bundle; choose another "
                         "folder")


def export_source(model: str | Path, checkpoint: Path | None) -> BundleSource:
    """A hub id with the commit of the snapshot exported, or the local checkpoint folder."""
    if Path(model).expanduser().exists() or checkpoint is None:
        return BundleSource(kind="export", path=str(Path(checkpoint or model).expanduser().resolve()))
    return BundleSource(kind="export", repo=str(model), revision=snapshot_revision(checkpoint))


def write_export_bundle(result: ExportResult, model: str | Path, out: Path, *, report: VerifyReport | None = None,
                        replace: bool = False) -> Bundle:
    return write_bundle(out, [result.path], result.type, export_source(model, result.checkpoint),
                        verification=asdict(report) if report is not None else None, replace=replace)
