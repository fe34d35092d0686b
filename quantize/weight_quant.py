"""GPTQ and AWQ checkpoints of rank1 models (``rank1-quantize gptq|awq``), made with GPTQModel.

GPTQModel is the maintained successor of auto-gptq and carries AWQ since AutoAWQ was archived; transformers
itself loads GPTQ and AWQ checkpoints through it. The outputs use the formats vLLM and auto-gptq/AutoAWQ
users read: GPTQ (``quant_method: gptq``, symmetric, ``desc_act: false``, int32-packed ``qweight/qzeros``,
fp16 ``scales``) and AWQ GEMM (``quant_method: awq``, ``version: gemm``, ``zero_point: true``, fp16), with
the quantization config both in ``config.json`` and ``quantize_config.json``, and a model card.

Calibration texts are what rank1 reads and writes: the rank1 prompt over real passages followed by the source
model's own greedy reasoning, ``</think>`` and its answer (:func:`quantize.calibration.rank1_calibration`).

Quantizing runs on CUDA when available and on the CPU otherwise (a small model takes minutes there).
The output folder appears only when the export is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.architectures import WEIGHT_QUANT_ARCHITECTURES, arch_spec
from quantize.gguf_export import load_checkpoint
from rank1_local.backends.hf import prepare_gptqmodel_env
from rank1_local.core.errors import Rank1Error
from rank1_local.models.hub import is_hub_id
from rank1_local.runs.atomic import remove_stale, write_text_atomic
from rank1_local.runs.run_header import library_versions

logger = logging.getLogger(__name__)

METHODS = ("gptq", "awq")
SUPPORTED_BITS = {"gptq": (4, 8), "awq": (4,)}
GPTQMODEL_HINT = "pip install 'rank1-local[gptq]' (GPTQModel ≥ 7.6 and optimum)"


@dataclass(frozen=True)
class WeightQuantOptions:
    """What to make: ``method`` gptq|awq, ``bits`` (GPTQ 4 or 8, AWQ 4), ``group_size`` (a divisor of every
    linear layer's input size; -1 = one group per row, GPTQ only), and the rank1 calibration set."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    calibration: Path | None = None  # JSONL of {qid, docid, query, text}; default: packaged TREC RAG 2024 pairs
    calibration_size: int | None = None
    calibration_seed: int = 0
    calibration_budget: int = 256  # reasoning tokens the source model writes per calibration pair
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1" …
    card: str | None = None  # the model card whose prompts calibrate (None: recognised from the checkpoint)


@dataclass(frozen=True)
class WeightQuantResult:
    path: Path
    method: str
    bits: int
    group_size: int
    n_bytes: int
    seconds: float
    calibration: str


def linear_input_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Input size of each kind of linear layer in a Llama/Qwen2/Mistral decoder block."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"hidden_size (q/k/v, gate/up)": hidden, "num_attention_heads × head_dim (o_proj)": heads * head_dim,
            "intermediate_size (down_proj)": int(config["intermediate_size"])}


def check_options(options: WeightQuantOptions, config: dict[str, Any]) -> None:
    """Refuse settings the method or the model cannot take, before any work is done."""
    if options.method not in METHODS:
        raise Rank1Error(f"unknown method {options.method!r}: choose gptq or awq")
    allowed = SUPPORTED_BITS[options.method]
    if options.bits not in allowed:
        raise Rank1Error(f"{options.method.upper()} supports --bits {' or '.join(map(str, allowed))}, "
                         f"not {options.bits}")
    g = options.group_size
    if g == -1 and options.method == "awq":
        raise Rank1Error("AWQ needs a group size (e.g. 128); -1 (per-row) is GPTQ only")
    if g != -1 and (g < 16 or g & (g - 1)):
        raise Rank1Error(f"--group-size must be a power of two ≥ 16 (32, 64, 128 …) or -1, not {g}")
    if g != -1:
        bad = {name: n for name, n in linear_input_sizes(config).items() if n % g}
        if bad:
            listed = ", ".join(f"{name} = {n}" for name, n in bad.items())
            raise Rank1Error(f"--group-size {g} does not divide this model's {listed}; pick a divisor "
                             "(e.g. 32, 64 or 128)")
    if options.calibration is not None and not Path(options.calibration).is_file():
        raise Rank1Error(f"{options.calibration}: no such calibration file")
    if options.calibration_size is not None and options.calibration_size < 1:
        raise Rank1Error("--calibration-size must be at least 1")
    if options.calibration_budget < 1:
        raise Rank1Error("--calibration-budget must be at least 1")


def _check_output(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Rank1Error(f"{out_dir} already exists and is not an empty folder; remove it or choose another --out")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Rank1Error(f"cannot create {out_dir.parent} ({exc.strerror or exc})") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise Rank1Error(f"output folder {out_dir.parent} is not writable")


def _import_gptqmodel() -> Any:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise Rank1Error(f"GPTQ/AWQ export needs torch and GPTQModel: {GPTQMODEL_HINT}") from None
    prepare_gptqmodel_env()
    try:
        import gptqmodel
    except ImportError:
        raise Rank1Error(f"GPTQ/AWQ export needs GPTQModel: {GPTQMODEL_HINT}") from None
    return gptqmodel


@contextlib.contextmanager
def logs_redirected(folder: Path) -> Iterator[None]:
    """GPTQModel writes per-layer scratch logs to ``./logs`` of the working directory (a module-level path in
    ``gptqmodel.looper.loop_processor``); point it into ``folder`` for the duration, then put it back."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # another GPTQModel layout: nothing to redirect
        yield
        return
    if not hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        yield
        return
    saved = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = saved


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise Rank1Error(f"--device {requested}: CUDA is not available (this torch build: {torch.__version__})")
    return requested


def _calibration_ids(tokenizer: Any, texts: list[str]) -> list[dict[str, list[int]]]:
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def model_card(source: str, options: WeightQuantOptions, calibration: str, seconds: float, device: str) -> str:
    """README.md for an export: what it is, how it was made (calibration set included), how to run it."""
    kind = (f"GPTQ {options.bits}-bit (group size {options.group_size}, symmetric, desc_act false)"
            if options.method == "gptq" else
            f"AWQ {options.bits}-bit GEMM (group size {options.group_size}, zero point, fp16)")
    installed = library_versions()
    versions = ", ".join(f"{n} {installed[n]}" for n in ("gptqmodel", "torch", "transformers") if n in installed)
    return f"""---
base_model: {source if is_hub_id(source) else Path(source).name}
library_name: transformers
pipeline_tag: text-generation
tags: [rank1, reranker, reasoning, {options.method}, {options.bits}-bit, quantized]
---

# {Path(source).name} — {kind}

An {options.method.upper()} export of the rank1 reranker `{source}`, made with `rank1-quantize {options.method}`
(rank1-local). rank1 writes a reasoning chain, closes it with `</think>`, and its relevance score is
P(" true") / (P(" true") + P(" false")) at the next token.

## How it was made
- Method: {kind}; layers quantized: every linear layer of the decoder blocks (embeddings, norms and
  `lm_head` kept in 16-bit).
- Calibration: {calibration}.
- Quantized on {device} in {seconds:.0f} s with {versions}.

## Use
rank1-local (same protocol as the official code; CPU or CUDA):

    rank1-local rerank --backend transformers --model {options.method}-export-folder --query "…" --docs passages.txt

vLLM (the official rank1 engine) reads this folder as it is: `LLM(model="<this folder>", quantization="{options.method}")`
or leave `quantization` unset to pick the fastest kernel. transformers loads it with
`AutoModelForCausalLM.from_pretrained(folder)` when `gptqmodel` (and, for GPTQ, `optimum`) are installed.
"""


def export_weight_quant(model: str | Path, out_dir: str | Path, options: WeightQuantOptions, *,
                        progress: bool = True) -> WeightQuantResult:
    """Quantize ``model`` (local folder or hub id) with GPTQ or AWQ into the new folder ``out_dir``."""
    out_dir = Path(out_dir).expanduser()
    checkpoint = load_checkpoint(model)
    path = checkpoint.path
    arch_spec(checkpoint.config, supported=WEIGHT_QUANT_ARCHITECTURES)  # the rank1 architectures only
    check_options(options, checkpoint.config)
    _check_output(out_dir)
    chatter = io.StringIO()  # GPTQModel prints its banner, tables and configs to stdout: never on our stdout
    quiet = contextlib.redirect_stdout(sys.stderr if progress else chatter)
    with quiet:
        gptqmodel = _import_gptqmodel()
    import torch
    from transformers import AutoTokenizer

    from quantize.calibration import rank1_calibration

    device = _device(options.device)
    start = time.perf_counter()
    calibration = rank1_calibration(path, path=options.calibration, size=options.calibration_size,
                                    seed=options.calibration_seed, max_think_tokens=options.calibration_budget,
                                    progress=progress, card=options.card)
    method_args: dict[str, Any] = {"bits": options.bits, "group_size": options.group_size}
    load_args: dict[str, Any] = {}
    quantize_args: dict[str, Any] = {}
    if options.method == "gptq":
        method_args.update(quant_method="gptq", format="gptq", sym=True, desc_act=False)
    else:
        # AutoAWQ's layout (zero point, fp16), the one vLLM's AWQ kernels read.
        method_args.update(quant_method="awq", format="gemm", sym=False)
        load_args["dtype"] = torch.float16
        if device == "cpu":
            quantize_args["backend"] = gptqmodel.BACKEND.AWQ_TORCH  # the portable packer; the default is CUDA-only
    remove_stale(out_dir.parent, rf"\.{re.escape(out_dir.name)}\.partial-(?P<pid>\d+)", "GPTQ/AWQ export")
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with quiet, logs_redirected(staging / "logs"):
            qmodel = gptqmodel.GPTQModel.load(str(path), gptqmodel.QuantizeConfig(**method_args), device=device,
                                              **load_args)
            tokenizer = AutoTokenizer.from_pretrained(path)
            qmodel.quantize(_calibration_ids(tokenizer, calibration.texts), batch_size=1, **quantize_args)
            qmodel.save(str(staging))
        logger.debug("GPTQModel output:\n%s", chatter.getvalue())
        seconds = time.perf_counter() - start
        source = str(model)
        write_text_atomic(staging / "README.md", model_card(source, options, calibration.description, seconds,
                                                            device))
        record = {"source": source, "method": options.method, "bits": options.bits,
                  "group_size": options.group_size, "calibration": calibration.description,
                  "calibration_seed": options.calibration_seed, "seconds": round(seconds, 1), "device": device,
                  "versions": library_versions()}
        write_text_atomic(staging / "rank1_export.json", json.dumps(record, indent=2) + "\n")
        shutil.rmtree(staging / "logs", ignore_errors=True)  # GPTQModel's scratch logs (quant_log.csv stays)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    logger.info("wrote %s (%s %d-bit, %.1f MB weights, %.0fs)", out_dir, options.method.upper(), options.bits,
                n_bytes / 1e6, seconds)
    return WeightQuantResult(out_dir, options.method, options.bits, options.group_size, n_bytes, seconds,
                             calibration.description)
