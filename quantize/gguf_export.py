"""Export a Hugging Face rank1 checkpoint to GGUF without torch.

Tensors are read memory-mapped from (sharded) safetensors and converted one at a time, in row
chunks, straight into the output file, so peak memory stays near the size of the largest tensor
in its output type. F32/F16/BF16/Q8_0 are written here; every other llama.cpp type is made from a
lossless intermediate by llama.cpp's own quantizer (:mod:`quantize.llama_quantize`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from quantize.architectures import (
    ArchSpec,
    HParams,
    arch_spec,
    extra_tensors,
    qk_row_order,
    read_hparams,
    write_hparams,
)
from quantize.checkpoint import Checkpoint, open_checkpoint
from quantize.gguf_types import DIRECT_TYPES, OutputType, parse_types
from quantize.imatrix import Imatrix, read_imatrix
from quantize.llama_quantize import quantize_gguf
from quantize.rerank_head import CLS_OUT, RerankHead, plan_rerank_head, write_rerank_metadata
from quantize.safetensors_io import FLOAT_DTYPES, TensorEntry, load_raw, to_float32
from quantize.tokenizer_export import write_vocab
from rank1_local.core.errors import Rank1Error, UnsupportedModelError
from rank1_local.models.hub import resolve_local_or_hub
from rank1_local.runs.atomic import atomic_path, remove_stale

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]
_CHUNK_ELEMENTS = 1 << 22  # rows are converted in chunks of about 16 MB of float32
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: where its data comes from and how rows are reordered."""

    gguf_name: str
    shape: tuple[int, ...]
    entry: TensorEntry | None = None
    row_order: np.ndarray | None = None
    constant: np.ndarray | None = None  # generated float32 data (e.g. rope_freqs)

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def n_cols(self) -> int:
        return self.shape[-1]


@dataclass(frozen=True)
class ExportPlan:
    checkpoint: Checkpoint
    spec: ArchSpec
    hparams: HParams
    jobs: list[TensorJob]
    rerank: RerankHead | None = None  # the classifier llama-server --reranking needs (Qwen3-Reranker)


@dataclass(frozen=True)
class ExportResult:
    type: str
    path: Path
    n_bytes: int
    seconds: float
    checkpoint: Path | None = None  # the checkpoint folder exported (a hub-cache snapshot for a hub id)


def _expected_names(spec: ArchSpec, hp: HParams) -> list[str]:
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
    if spec.qk_norm:
        per_layer += ["attn_q_norm", "attn_k_norm"]
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.{i}.{t}.weight" for i in range(hp.n_layers) for t in per_layer]
    if not hp.tie_word_embeddings:
        names.append("output.weight")
    return names


def _expected_shapes(spec: ArchSpec, hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = {"token_embd.weight": (hp.vocab_size, hp.hidden_size)}
    for i in range(hp.n_layers):
        shapes[f"blk.{i}.attn_q.weight"] = (hp.n_heads * hp.head_dim, hp.hidden_size)
        shapes[f"blk.{i}.attn_k.weight"] = (hp.n_kv_heads * hp.head_dim, hp.hidden_size)
        shapes[f"blk.{i}.attn_v.weight"] = (hp.n_kv_heads * hp.head_dim, hp.hidden_size)
        shapes[f"blk.{i}.ffn_up.weight"] = (hp.ffn_size, hp.hidden_size)
        if spec.qk_norm:
            shapes[f"blk.{i}.attn_q_norm.weight"] = (hp.head_dim,)
            shapes[f"blk.{i}.attn_k_norm.weight"] = (hp.head_dim,)
    if not hp.tie_word_embeddings:
        shapes["output.weight"] = (hp.vocab_size, hp.hidden_size)
    return shapes


def plan_export(checkpoint: Checkpoint, rerank: bool | None = None) -> ExportPlan:
    """Map every checkpoint tensor to its GGUF tensor, checking names and shapes against config.json; with the rerank
    head of a Qwen3-Reranker when ``rerank`` is True, or None and the checkpoint is recognised as one
    (:mod:`quantize.rerank_head`)."""
    spec = arch_spec(checkpoint.config)
    hp = read_hparams(checkpoint.config)
    head = plan_rerank_head(checkpoint, spec, hp, rerank)
    name_map = gguf.TensorNameMap(spec.gguf_arch, hp.n_layers)
    jobs: dict[str, TensorJob] = {}
    for hf_name, entry in sorted(checkpoint.tensors.items()):
        if hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and hp.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedModelError(
                f"tensor {hf_name!r} has no GGUF counterpart for {spec.hf_architecture} (unexpected checkpoint layout)")
        if entry.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(f"tensor {hf_name!r} is {entry.dtype}; only F32/F16/BF16 checkpoints are "
                                        "supported (pre-quantized checkpoints cannot be exported)")
        row_order = None
        if spec.permute_qk and ".attn_q." in gguf_name:
            row_order = qk_row_order(entry.shape[0], hp.n_heads)
        elif spec.permute_qk and ".attn_k." in gguf_name:
            row_order = qk_row_order(entry.shape[0], hp.n_kv_heads)
        jobs[gguf_name] = TensorJob(gguf_name, entry.shape, entry=entry, row_order=row_order)
    for gguf_name, data in extra_tensors(spec, hp).items():
        jobs[gguf_name] = TensorJob(gguf_name, data.shape, constant=data)
    if head is not None and head.source in checkpoint.tensors:
        jobs[CLS_OUT] = TensorJob(CLS_OUT, (len(head.rows), hp.hidden_size), entry=checkpoint.tensors[head.source],
                                  row_order=head.rows)

    missing = [n for n in _expected_names(spec, hp) if n not in jobs]
    if missing:
        raise UnsupportedModelError(f"{checkpoint.path}: checkpoint lacks tensor(s) {', '.join(missing[:5])}"
                                    f"{' …' if len(missing) > 5 else ''} (incomplete or not a {spec.hf_architecture})")
    for name, want in _expected_shapes(spec, hp).items():
        if jobs[name].shape != want:
            raise UnsupportedModelError(
                f"{checkpoint.path}: tensor {name} has shape {jobs[name].shape}, config.json implies {want}")
    order = sorted(jobs, key=lambda n: (0, n) if not n.startswith("blk.") else
                   (1, f"{int(n.split('.')[1]):06d}.{n}"))
    return ExportPlan(checkpoint, spec, hp, [jobs[n] for n in order], rerank=head)


def tensor_type(job: TensorJob, out: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type one tensor gets in a file of type ``out``: 1-D tensors stay F32, as in llama.cpp."""
    if len(job.shape) == 1 or job.constant is not None:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[out]
    if job.n_cols % block:
        logger.warning("%s: row size %d is not a multiple of %d, writing F16", job.gguf_name, job.n_cols, block)
        return gguf.GGMLQuantizationType.F16
    return out


def _row_bytes(n_cols: int, qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return n_cols // block * type_size


def _encode_rows(rows_f32: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        encoded = np.ascontiguousarray(rows_f32, dtype=np.float32)
    elif qtype == gguf.GGMLQuantizationType.F16:
        encoded = rows_f32.astype(np.float16)
    else:
        encoded = gguf.quants.quantize(rows_f32, qtype)
    return encoded.view(np.uint8).reshape(rows_f32.shape[0], -1)


def encode_tensor(job: TensorJob, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes in ``qtype``, as a (rows, row_bytes) uint8 array, built chunk by chunk."""
    if job.constant is not None:
        return _encode_rows(job.constant.reshape(job.n_rows, job.n_cols), qtype)
    assert job.entry is not None
    raw = load_raw(job.entry).reshape(-1, job.n_cols)  # a row selection (rerank head) reads more rows than it writes
    out = np.empty((job.n_rows, _row_bytes(job.n_cols, qtype)), dtype=np.uint8)
    if job.row_order is None and qtype.name == job.entry.dtype:
        out[...] = raw.view(np.uint8).reshape(out.shape)  # same type: copy bytes, no rounding at all
        return out
    step = max(1, _CHUNK_ELEMENTS // job.n_cols)
    for r0 in range(0, job.n_rows, step):
        r1 = min(job.n_rows, r0 + step)
        rows = raw[job.row_order[r0:r1]] if job.row_order is not None else raw[r0:r1]
        out[r0:r1] = _encode_rows(to_float32(rows, job.entry.dtype), qtype)
    return out


def write_gguf(plan: ExportPlan, out_type: str, path: Path, *, progress: bool = True, desc: str | None = None) -> None:
    """Write ``plan`` as one GGUF file of a direct type (F32/F16/BF16/Q8_0) to ``path`` (``desc``: what the progress
    bar says it makes, by default the file's name)."""
    qtype, file_type = DIRECT_TYPES[out_type]
    hp = plan.hparams
    writer = gguf.GGUFWriter(path=None, arch=plan.spec.gguf_name)
    try:
        writer.add_name(plan.checkpoint.name)
        write_hparams(writer, plan.spec, hp)
        write_vocab(writer, plan.checkpoint.path, hp.vocab_size)
        if plan.rerank is not None:
            write_rerank_metadata(writer)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        types = [tensor_type(job, qtype) for job in plan.jobs]
        sizes = [job.n_rows * _row_bytes(job.n_cols, ttype) for job, ttype in zip(plan.jobs, types)]
        for job, ttype, nbytes in zip(plan.jobs, types, sizes):
            byte_shape = (*job.shape[:-1], _row_bytes(job.n_cols, ttype))
            writer.add_tensor_info(job.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=ttype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc=desc or path.name,
                  disable=not progress, leave=False) as bar:
            for job, ttype, size in zip(plan.jobs, types, sizes):
                writer.write_tensor_data(encode_tensor(job, ttype))
                bar.update(size)
    finally:
        writer.close()


def output_name(model_name: str, out_type: str) -> str:
    return f"{model_name}-{out_type}.gguf"


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".rank1-write-test-"):
            pass
    except OSError as exc:
        raise Rank1Error(f"output folder {out_dir} is not writable ({exc.strerror or exc})") from None


def lossless_type(checkpoint: Checkpoint) -> str:
    """The GGUF type that holds the checkpoint's weights exactly (source for llama.cpp's quantizer)."""
    return {"BF16": "BF16", "F16": "F16"}.get(checkpoint.source_dtype, "F32")


def load_checkpoint(model: str | Path) -> Checkpoint:
    path = resolve_local_or_hub(model, allow_patterns=CHECKPOINT_PATTERNS, what="checkpoint folder")
    name = str(model).rstrip("/").split("/")[-1] if not Path(model).expanduser().exists() else path.name
    return open_checkpoint(path, name=name)


@dataclass(frozen=True)
class ImatrixOptions:
    """Where the importance matrix comes from: ``"auto"`` (computed with the source model over rank1
    calibration texts) or a file made by ``llama-imatrix`` / an earlier export."""

    source: str | Path
    calibration: Path | None = None  # JSONL of {qid, docid, query, text}; default: the packaged TREC RAG 2024 set
    size: int | None = None
    seed: int = 0
    max_think_tokens: int = 256
    card: str | None = None  # the model card whose prompts calibrate (None: recognised from the checkpoint)


def prepare_imatrix(options: ImatrixOptions, plan: ExportPlan, out_dir: Path, *,
                    progress: bool = True) -> tuple[Imatrix, Path]:
    """Load or compute the importance matrix for ``plan``'s model, and the file it is in; a computed one is saved
    as ``<name>.imatrix.gguf`` in ``out_dir`` (reusable with ``--imatrix FILE``)."""
    if str(options.source) == "auto":
        from quantize.calibration import rank1_calibration
        from quantize.imatrix import compute_imatrix, write_imatrix

        calibration = rank1_calibration(plan.checkpoint.path, path=options.calibration, size=options.size,
                                        seed=options.seed, max_think_tokens=options.max_think_tokens,
                                        progress=progress, card=options.card)
        names = {job.entry.name: job.gguf_name for job in plan.jobs
                 if job.entry is not None and job.gguf_name != CLS_OUT}
        imatrix = compute_imatrix(plan.checkpoint.path, calibration.texts, gguf_names=names,
                                  dataset=calibration.description, progress=progress)
        path = out_dir / f"{plan.checkpoint.name}.imatrix.gguf"
        write_imatrix(path, imatrix)
        logger.info("importance matrix (%s) saved to %s", calibration.description, path)
    else:
        path = Path(options.source).expanduser()
        imatrix = read_imatrix(path)
    weights = {job.gguf_name for job in plan.jobs if len(job.shape) == 2}
    if not weights & set(imatrix.entries):
        raise Rank1Error(f"the importance matrix {options.source} has no entries for this model's tensors "
                         "(was it made for another model?)")
    return imatrix, path


def remove_export_leftovers(out_dir: Path) -> None:
    """Remove what exports killed midway left in ``out_dir``: their scratch folders (the intermediate GGUF) and the
    temporary files of the GGUFs and importance matrices they were writing. Those of running exports stay."""
    remove_stale(out_dir, r"\.rank1-export-(?P<pid>\d+)-.*", "export")
    remove_stale(out_dir, r"\..+\.gguf\.(?P<pid>\d+)\.tmp", "export")


def export_gguf(model: str | Path, out_dir: str | Path, types: str | list[str], *,
                threads: int | None = None, progress: bool = True,
                imatrix: ImatrixOptions | None = None, allow_no_imatrix: bool = False,
                rerank: bool | None = None) -> list[ExportResult]:
    """Export ``model`` (local folder or hub id) to one GGUF file per requested type in ``out_dir``; types
    quantized by llama.cpp use the importance matrix when ``imatrix`` is given (i-quants such as IQ4_XS are
    refused without one unless ``allow_no_imatrix``). A Qwen3-Reranker gets the rerank head llama-server needs
    (``rerank``: None recognises one by name or model card, True and False decide; :mod:`quantize.rerank_head`)."""
    out_types: list[OutputType] = parse_types(types, have_imatrix=imatrix is not None,
                                              allow_no_imatrix=allow_no_imatrix)
    out_dir = Path(out_dir).expanduser()
    checkpoint = load_checkpoint(model)
    plan = plan_export(checkpoint, rerank)
    _check_writable(out_dir)
    matrix, matrix_file = None, ""
    if imatrix is not None and any(not t.direct for t in out_types):
        matrix, matrix_path = prepare_imatrix(imatrix, plan, out_dir, progress=progress)
        matrix_file = matrix_path.name
    results: list[ExportResult] = []
    intermediate: Path | None = None
    remove_export_leftovers(out_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f".rank1-export-{os.getpid()}-", dir=out_dir))
    try:
        for out_type in sorted(out_types, key=lambda t: not t.direct):
            target = out_dir / output_name(checkpoint.name, out_type.name)
            start = time.perf_counter()
            if out_type.direct:
                with atomic_path(target) as tmp:
                    write_gguf(plan, out_type.name, tmp, progress=progress, desc=f"writing {target.name}")
            else:
                if intermediate is None:
                    source_type = lossless_type(checkpoint)
                    done = [r.path for r in results if r.type == source_type]
                    intermediate = done[0] if done else scratch / output_name(checkpoint.name, source_type)
                    if not done:
                        write_gguf(plan, source_type, intermediate, progress=progress,
                                   desc=f"writing the {source_type} source for llama.cpp's quantizer")
                logger.info("making %s with llama.cpp's quantizer%s", target.name,
                            " and the importance matrix" if matrix is not None else "")
                with atomic_path(target) as tmp:
                    quantize_gguf(intermediate, tmp, out_type.name, threads=threads, imatrix=matrix,
                                  imatrix_file=matrix_file)
            result = ExportResult(out_type.name, target, target.stat().st_size, time.perf_counter() - start,
                                  checkpoint=checkpoint.path)
            logger.info("wrote %s (%.1f MB, %.1fs)", target, result.n_bytes / 1e6, result.seconds)
            results.append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results
