"""The quantization types a study compares, and their exports (made once, kept in the work folder).

Type names: any GGUF type (``F16``, ``Q8_0``, ``Q4_K_M``, ``IQ3_M`` …), a GGUF type quantized with the rank1
importance matrix (``Q4_K_M+imatrix``), and GPTQ/AWQ checkpoints (``gptq-4bit``, ``gptq-8bit``, ``awq-4bit``, group
size 128). GGUF files come from :func:`quantize.gguf_export.export_gguf` (llama.cpp's own quantizer; the importance
matrix is computed once with the source model over rank1 calibration texts and reused), GPTQ/AWQ checkpoints from
:func:`quantize.weight_quant.export_weight_quant` (the ``gptq`` extra). Both write atomically, so a file present in
the work folder is a complete export and is never made again.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import MissingExtraError

logger = logging.getLogger(__name__)

IMATRIX_SUFFIX = "+imatrix"
WEIGHT_QUANT = re.compile(r"^(gptq|awq)-(\d+)bit$", re.IGNORECASE)
GROUP_SIZE = 128


@dataclass(frozen=True)
class StudyType:
    """One quantization type of a study. ``family``: ``gguf``, ``gptq`` or ``awq``."""

    label: str
    family: str
    gguf_type: str | None = None
    imatrix: bool = False
    bits: int | None = None

    @property
    def is_gguf(self) -> bool:
        return self.family == "gguf"


@dataclass(frozen=True)
class Calibration:
    """The rank1 calibration set used for importance matrices and GPTQ/AWQ (None: the packaged TREC RAG 2024 set)."""

    file: Path | None = None
    size: int | None = None
    seed: int = 0
    budget: int = 256


def parse_study_types(spec: str) -> list[StudyType]:
    """``"F16,Q4_K_M,Q4_K_M+imatrix,gptq-4bit"`` -> types, every problem reported before anything runs."""
    from quantize.gguf_types import DIRECT_TYPES, NEEDS_IMATRIX, parse_types
    from quantize.weight_quant import SUPPORTED_BITS

    out: list[StudyType] = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        match = WEIGHT_QUANT.match(raw)
        if match:
            method, bits = match.group(1).lower(), int(match.group(2))
            if bits not in SUPPORTED_BITS[method]:
                raise Rank1Error(f"{raw}: {method.upper()} supports {' or '.join(map(str, SUPPORTED_BITS[method]))} "
                                 "bits")
            out.append(StudyType(f"{method}-{bits}bit", method, bits=bits))
            continue
        with_imatrix = raw.lower().endswith(IMATRIX_SUFFIX)
        name = (raw[:-len(IMATRIX_SUFFIX)] if with_imatrix else raw).strip().upper()
        (gguf_type,) = parse_types([name], have_imatrix=True)
        if with_imatrix and gguf_type.name in DIRECT_TYPES:
            raise Rank1Error(f"{raw}: {gguf_type.name} is written directly, without llama.cpp's quantizer, so an "
                             "importance matrix would not change it; drop '+imatrix'")
        if not with_imatrix and gguf_type.name in NEEDS_IMATRIX:
            raise Rank1Error(f"{raw}: llama.cpp makes {gguf_type.name} only with an importance matrix: write "
                             f"{gguf_type.name}+imatrix")
        label = gguf_type.name + (IMATRIX_SUFFIX if with_imatrix else "")
        out.append(StudyType(label, "gguf", gguf_type=gguf_type.name, imatrix=with_imatrix))
    if not out:
        raise Rank1Error("--types: no types given (e.g. --types F16,Q8_0,Q4_K_M,Q4_K_M+imatrix)")
    labels = [t.label for t in out]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise Rank1Error(f"--types: {', '.join(twice)} given twice")
    if any(not t.is_gguf for t in out) and importlib.util.find_spec("gptqmodel") is None:
        raise MissingExtraError("GPTQ/AWQ types need GPTQModel, which is not installed: "
                                "pip install 'rank1-local[gptq]'")
    return out


def gguf_folder(exports: Path, with_imatrix: bool) -> Path:
    return exports / ("gguf-imatrix" if with_imatrix else "gguf")


def export_path(t: StudyType, exports: Path, model_name: str) -> Path:
    from quantize.gguf_export import output_name

    if t.is_gguf:
        return gguf_folder(exports, t.imatrix) / output_name(model_name, t.gguf_type or "")
    return exports / "weight-quant" / t.label


def export_all(types: list[StudyType], source: Path, exports: Path, *, calibration: Calibration = Calibration(),
               threads: int | None = None, progress: bool = True, card: str | None = None) -> dict[str, Path]:
    """Export every type not yet in ``exports``; returns label -> export path. ``card``: the model card, whose
    prompts calibrate importance matrices and GPTQ/AWQ (a Qwen3-Reranker's GGUFs also get llama-server's rerank
    head); None: recognised from the checkpoint."""
    from quantize.gguf_export import ImatrixOptions, export_gguf, load_checkpoint
    from rank1_local.core.cards import QWEN3_RERANKER

    name = load_checkpoint(source).name
    paths = {t.label: export_path(t, exports, name) for t in types}
    for with_imatrix in (False, True):
        todo = [t for t in types if t.is_gguf and t.imatrix == with_imatrix and not paths[t.label].exists()]
        if not todo:
            continue
        folder = gguf_folder(exports, with_imatrix)
        options = None
        if with_imatrix:
            matrix = folder / f"{name}.imatrix.gguf"
            options = ImatrixOptions(matrix if matrix.exists() else "auto", calibration=calibration.file,
                                     size=calibration.size, seed=calibration.seed, max_think_tokens=calibration.budget,
                                     card=card)
        logger.info("exporting %s", ", ".join(t.label for t in todo))
        export_gguf(source, folder, [t.gguf_type or "" for t in todo], threads=threads, progress=progress,
                    imatrix=options, allow_no_imatrix=True, rerank=True if card == QWEN3_RERANKER.name else None)
    for t in types:
        if t.is_gguf or paths[t.label].exists():
            continue
        from quantize.weight_quant import WeightQuantOptions, export_weight_quant

        logger.info("exporting %s", t.label)
        export_weight_quant(source, paths[t.label], WeightQuantOptions(
            method=t.family, bits=t.bits or 4, group_size=GROUP_SIZE, calibration=calibration.file,
            calibration_size=calibration.size, calibration_seed=calibration.seed,
            calibration_budget=calibration.budget, card=card), progress=progress)
    return paths


def export_bytes(path: Path) -> int:
    """The size of an export: the GGUF file, or a GPTQ/AWQ checkpoint's weight files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return path.stat().st_size
