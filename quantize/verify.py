"""Check a GGUF export against its source: next-token KL divergence, top-1 agreement, rank1 score.

The source is the Hugging Face checkpoint run in transformers (``reference`` extra), or another
GGUF file (e.g. verify Q4_K_M against F16 without torch). Every calibration prompt is fed to both
as the same token ids; the rank1 score is read at the answer position, right after the prompt's
reasoning is closed with ``\\n</think>``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from quantize.calibration import load_calibration
from quantize.gguf_logits import LlamaCppLogits
from rank1_local.core.errors import Rank1Error
from rank1_local.core.prompt import THINK_CLOSE
from rank1_local.core.protocol import answer_token_ids, true_false_score
from rank1_local.models.gguf_file import check_gguf_file
from rank1_local.models.hub import resolve_local_or_hub
from rank1_local.runs.atomic import write_text_atomic

logger = logging.getLogger(__name__)

ANSWER_SUFFIX = "\n" + THINK_CLOSE


class LogitSource(Protocol):
    def tokenize(self, text: str) -> list[int]: ...
    def logits(self, ids: list[int]) -> np.ndarray: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class PromptComparison:
    qid: str
    docid: str
    n_tokens: int
    tokens_match: bool
    kl_mean: float
    kl_max: float
    top1_agreement: float
    score_source: float
    score_gguf: float


@dataclass(frozen=True)
class VerifyReport:
    gguf: str
    source: str
    source_engine: str
    n_prompts: int
    kl_mean: float
    kl_max: float
    top1_agreement: float
    score_abs_diff_mean: float
    score_abs_diff_max: float
    decision_agreement: float
    tokenizer_agreement: float
    prompts: list[PromptComparison] = field(default_factory=list)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_reference || P_test) per position, in nats."""
    lp, lq = _log_softmax(reference_logits), _log_softmax(test_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def compare(source: LogitSource, gguf: LlamaCppLogits, texts: list[tuple[str, str, str]],
            progress: bool = True) -> list[PromptComparison]:
    true_id, false_id = answer_token_ids(gguf.tokenize)
    rows = []
    for qid, docid, text in tqdm(texts, desc="verify", disable=not progress, leave=False):
        ids = source.tokenize(text)
        ref, got = source.logits(ids), gguf.logits(ids)
        kl = kl_divergence(ref, got)
        rows.append(PromptComparison(
            qid=qid, docid=docid, n_tokens=len(ids), tokens_match=gguf.tokenize(text) == ids,
            kl_mean=float(kl.mean()), kl_max=float(kl.max()),
            top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()),
            score_source=true_false_score(float(ref[-1, true_id]), float(ref[-1, false_id])),
            score_gguf=true_false_score(float(got[-1, true_id]), float(got[-1, false_id]))))
    return rows


def summarize(gguf_path: Path, source: str, engine: str, rows: list[PromptComparison]) -> VerifyReport:
    diffs = np.array([abs(r.score_source - r.score_gguf) for r in rows])
    n_tok = np.array([r.n_tokens for r in rows], dtype=np.float64)
    return VerifyReport(
        gguf=str(gguf_path), source=source, source_engine=engine, n_prompts=len(rows),
        kl_mean=float(np.average([r.kl_mean for r in rows], weights=n_tok)),
        kl_max=float(max(r.kl_max for r in rows)),
        top1_agreement=float(np.average([r.top1_agreement for r in rows], weights=n_tok)),
        score_abs_diff_mean=float(diffs.mean()), score_abs_diff_max=float(diffs.max()),
        decision_agreement=float(np.mean([(r.score_source > 0.5) == (r.score_gguf > 0.5) for r in rows])),
        tokenizer_agreement=float(np.mean([r.tokens_match for r in rows])),
        prompts=rows)


def open_source(source: str | Path, n_ctx: int, threads: int | None) -> tuple[LogitSource, str]:
    path = resolve_local_or_hub(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"],
                                what="checkpoint folder or .gguf file")
    if path.is_file():
        check_gguf_file(path)
        return LlamaCppLogits(path, n_ctx=n_ctx, threads=threads), "llama.cpp"
    from quantize.hf_reference import TransformersLogits

    return TransformersLogits(path), "transformers-fp32"


def verify_gguf(gguf_path: str | Path, source: str | Path, *, n_prompts: int = 8,
                calibration: Path | None = None, threads: int | None = None,
                progress: bool = True) -> VerifyReport:
    gguf_path = Path(gguf_path)
    check_gguf_file(gguf_path)
    pairs = load_calibration(calibration, limit=n_prompts)
    if not pairs:
        raise Rank1Error("the calibration set is empty")
    texts = [(p.qid, p.docid, p.prompt + ANSWER_SUFFIX) for p in pairs]
    gguf = LlamaCppLogits(gguf_path, n_ctx=4096, threads=threads)
    src, engine = open_source(source, 4096, threads)
    try:
        rows = compare(src, gguf, texts, progress=progress)
    finally:
        src.close()
        gguf.close()
    return summarize(gguf_path, str(source), engine, rows)


def report_paths(gguf_path: Path) -> tuple[Path, Path]:
    return gguf_path.with_name(gguf_path.name + ".verify.json"), gguf_path.with_name(gguf_path.name + ".verify.md")


def render_markdown(report: VerifyReport) -> str:
    lines = [
        f"# Verification of `{Path(report.gguf).name}`",
        "",
        f"Source: `{report.source}` ({report.source_engine}); {report.n_prompts} rank1 calibration prompts "
        "(TREC RAG 2024 queries and passages), scored at the answer position after `\\n</think>`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| mean KL(source ‖ gguf), nats/token | {report.kl_mean:.3g} |",
        f"| max KL, nats | {report.kl_max:.3g} |",
        f"| top-1 next-token agreement | {report.top1_agreement:.2%} |",
        f"| mean / max abs Δ rank1 score | {report.score_abs_diff_mean:.3g} / {report.score_abs_diff_max:.3g} |",
        f"| decision agreement (score > 0.5) | {report.decision_agreement:.2%} |",
        f"| prompts tokenized identically | {report.tokenizer_agreement:.2%} |",
        "",
    ]
    return "\n".join(lines)


def write_report(report: VerifyReport) -> tuple[Path, Path]:
    json_path, md_path = report_paths(Path(report.gguf))
    write_text_atomic(json_path, json.dumps(asdict(report), indent=2) + "\n")
    write_text_atomic(md_path, render_markdown(report))
    return json_path, md_path
