"""``rank1-bench study``: export a model to several quantization types, score each and the reference with the official
protocol, compare, and write ``study.md``, ``study.json``, ``study.png`` and ``study.html``.

The work folder holds everything the study makes, and every step resumes from it:

    WORK/inputs/pairs.jsonl, qrels.txt       the pairs to score (rewritten only if they would change: they must not)
    WORK/exports/gguf[-imatrix]/…, weight-quant/…   one export per type, made once (atomic writes)
    WORK/runs/reference-<backend>-<dtype>.jsonl, runs/<TYPE>.jsonl   run files: rows appended as pairs finish
    WORK/runs/<TYPE>@<BUDGET>.jsonl          with --budgets or --prefilter: each type's calibration run (its one
                                             operating point scored directly, and timed)
    WORK/runs/prefilter.jsonl                with --prefilter: the prefilter's scores of every pair
    WORK/study-state.json                    the inputs, source model and settings this folder belongs to

A study killed at any point and started again exports nothing twice and scores only the pairs its run files lack.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.study.exports import Calibration, StudyType, export_all, export_bytes
from benchmarks.study.inputs import StudyInputs, write_inputs
from benchmarks.study.scoring import Scorer, ScoringJob, read_job_record, subprocess_scorer
from rank1_local.core.cards import RANK1, ModelCard, card_named, recognise_card
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import MissingExtraError, install_hint
from rank1_local.runs.atomic import write_text_atomic

logger = logging.getLogger(__name__)
REFERENCES = ("vllm", "transformers")


@dataclass(frozen=True)
class Sweep:
    """What a study maps besides the types (``--budgets``, ``--prefilter``, ``--keep``, ``--target-latency``): the
    budgets are the scoring config's (``max_think_tokens`` and its ``derive_budgets``); ``prefilter``, a fast reranker
    scored on every pair, and ``keeps``, the cuts of the cascade points (rank1 on the prefilter's best N per query)."""

    prefilter: str | None = None
    prefilter_backend: str = "llama.cpp"
    keeps: tuple[int, ...] = ()
    target_latency: float | None = None

    def __post_init__(self) -> None:
        if self.keeps and self.prefilter is None:
            raise Rank1Error("--keep goes with --prefilter MODEL (the cascade points: rank1 on the prefilter's best N)")
        if self.prefilter is not None and not self.keeps:
            raise Rank1Error("--prefilter needs --keep N[,N…]: the documents per query rank1 reasons over in each "
                             "cascade point")
        if any(k < 1 for k in self.keeps):
            raise Rank1Error(f"--keep values must be at least 1, got {', '.join(map(str, self.keeps))}")
        if self.prefilter_backend not in ("llama.cpp", "transformers"):
            raise Rank1Error("--prefilter-backend must be llama.cpp or transformers")
        if self.target_latency is not None and not self.target_latency > 0:
            raise Rank1Error(f"--target-latency must be more than 0 seconds, got {self.target_latency:g}")


def check_sweep(config: ScoringConfig, types: list[StudyType], weight_quant_backend: str) -> None:
    """Budgets are derived row by row, which the vLLM backend does not do."""
    if config.derive_budgets and weight_quant_backend == "vllm" and any(not t.is_gguf for t in types):
        raise Rank1Error("--budgets derives each budget row by row, which the vLLM backend does not do: GPTQ/AWQ "
                         "types with --budgets run on --weight-quant-backend transformers")


def study_card(model: str | Path, card: str | None) -> ModelCard:
    """The model card a study scores under: the one named (``--card``), else the one the source checkpoint's
    config.json and name show (a hub id by its name alone: nothing is fetched to decide)."""
    if card is not None:
        return card_named(card)
    from rank1_local.backends.hf import checkpoint_card

    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return checkpoint_card(path, None)
    return recognise_card(name=str(model))


def check_card(card: ModelCard, config: ScoringConfig, reference: str | None, types: list[StudyType],
               weight_quant_backend: str) -> None:
    """What a card that does not reason cannot do: map reasoning budgets, or run on the vLLM backend (rank1's official
    flow only); its reference is transformers, the model card's own code (float16 on CUDA, float32 on the CPU)."""
    if card.reasons:
        return
    if config.derive_budgets:
        raise Rank1Error(f"--budgets maps reasoning budgets, but the {card.name} card does not reason (its answer is "
                         "read at the last prompt position): leave out --budgets")
    if reference == "vllm":
        raise Rank1Error(f"--reference vllm: the vLLM backend runs rank1's official flow only, not the {card.name} "
                         "card; its reference is --reference transformers (float16 on CUDA, float32 on the CPU)")
    if weight_quant_backend == "vllm" and any(not t.is_gguf for t in types):
        raise Rank1Error(f"--weight-quant-backend vllm: the vLLM backend runs rank1's official flow only, not the "
                         f"{card.name} card; GPTQ/AWQ types run on --weight-quant-backend transformers")


def calibration_budget(config: ScoringConfig, sweep: Sweep) -> int | None:
    """The budget of each type's one measured point, scored directly: the smallest of several budgets, or 1 token
    when a prefilter is the only sweep (None: one point per type, its own run measured). With the budget sweep's own
    run it gives the type's cost per prompt and per generated token, from which every other point's time follows."""
    if config.derive_budgets:
        return min(config.derive_budgets)
    return 1 if sweep.prefilter is not None else None


@dataclass
class StudySettings:
    """What to study and how. ``reference_dtype`` None: float16 for vLLM (the official setting), ``auto`` for
    transformers (float16 on CUDA, float32 on the CPU)."""

    model: str
    types: list[StudyType]
    config: ScoringConfig
    work: Path
    out: Path
    reference: str = "vllm"
    reference_dtype: str | None = None
    vllm_python: str | None = None  # the Python of vLLM's own virtualenv (None: this one)
    weight_quant_backend: str = "transformers"  # where GPTQ/AWQ checkpoints run: transformers or vllm
    parallel: int = 8
    threads: int | None = None
    n_gpu_layers: int = 0
    calibration: Calibration = field(default_factory=Calibration)
    recall_k: tuple[int, ...] = (10,)
    drop_queries_without_relevant: bool = False  # nDCG@10 / Recall@k: trec_eval counts such queries 0
    title: str = "Quantization study"
    note: str | None = None  # a paragraph for the top of study.md
    progress: bool = True
    sweep: Sweep = field(default_factory=Sweep)
    card: str = RANK1.name  # the model card every run scores under (reference, exports)

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise Rank1Error(f"--reference must be one of {', '.join(REFERENCES)}, not {self.reference!r}")
        if self.weight_quant_backend not in ("transformers", "vllm"):
            raise Rank1Error("--weight-quant-backend must be transformers or vllm")
        check_sweep(self.config, self.types, self.weight_quant_backend)
        check_card(card_named(self.card), self.config, self.reference, self.types, self.weight_quant_backend)
        check_vllm_python(self.vllm_python)

    @property
    def scoring_settings(self) -> dict[str, Any]:
        """The protocol settings and, for a card other than rank1, the card (as run headers write them)."""
        return self.config.to_dict() | ({"card": self.card} if self.card != RANK1.name else {})

    @property
    def budgets(self) -> tuple[int, ...]:
        """Every reasoning budget of the study, smallest first (the largest is the one generated)."""
        return (*self.config.derive_budgets, self.config.max_think_tokens)

    @property
    def reference_dtype_resolved(self) -> str:
        return self.reference_dtype or ("float16" if self.reference == "vllm" else "auto")


@dataclass
class StudyRuns:
    """Where a study's runs are, once scored."""

    pairs_file: Path
    qrels_file: Path | None
    reference: Path
    runs: dict[str, Path]  # label -> run file
    exports: dict[str, Path]  # label -> export
    source: Path
    seconds: float
    calibration: dict[str, Path] = field(default_factory=dict)  # label -> its run at the calibration budget
    prefilter: Path | None = None  # the prefilter's run file (every pair)


def source_fingerprint(source: Path) -> str:
    """The source checkpoint's identity: its config and the names and sizes of its weight files (cheap for 70 GB)."""
    h = hashlib.sha256((source / "config.json").read_bytes())
    for f in sorted(source.glob("*.safetensors")):
        h.update(f"{f.name}\x00{f.stat().st_size}\x00".encode())
    return h.hexdigest()


def check_state(work: Path, state: dict[str, Any]) -> None:
    """A work folder belongs to one study (inputs, source model, protocol settings); anything else is refused."""
    path = work / "study-state.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key, what in (("inputs", "other inputs (pairs or qrels)"), ("source", "another source model"),
                          ("config", "other scoring settings")):
            if old.get(key) != state[key]:
                detail = f" ({old.get(key)} there, {state[key]} now)" if key == "config" else ""
                raise Rank1Error(f"--work {work} holds a study of {what}{detail}; use another --work folder, or "
                                 "delete this one to start again")
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(state, indent=2, sort_keys=True) + "\n")


def reference_job(settings: StudySettings, source: Path, pairs_file: Path, runs: Path) -> ScoringJob:
    dtype = settings.reference_dtype_resolved
    run_file = runs / f"reference-{settings.reference}-{dtype}.jsonl"
    config = settings.config.without_derived().to_dict()  # the reference runs at the study's (largest) budget
    if settings.reference == "vllm":
        engine: dict[str, Any] = {"dtype": dtype}
        return ScoringJob("reference", "vllm", str(source), engine, config, str(pairs_file),
                          str(run_file), python=settings.vllm_python, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                          progress=settings.progress, card=settings.card)
    return ScoringJob("reference", "transformers", str(source), {"dtype": dtype, "device": "auto"},
                      config, str(pairs_file), str(run_file), progress=settings.progress, card=settings.card)


def type_job(settings: StudySettings, t: StudyType, export: Path, pairs_file: Path, runs: Path,
             budget: int | None = None) -> ScoringJob:
    """The type's run: at the largest budget, deriving the others (``budget`` None), or its calibration run, scored
    directly at ``budget`` (``runs/TYPE@BUDGET.jsonl``)."""
    config_obj = settings.config
    if budget is not None:
        config_obj = ScoringConfig(**(config_obj.without_derived().to_dict() | {"max_think_tokens": budget}))
    run_file = str(runs / (f"{t.label}.jsonl" if budget is None else f"{t.label}@{budget}.jsonl"))
    config = config_obj.to_dict()
    if t.is_gguf:
        engine = {"parallel": settings.parallel, "threads": settings.threads, "n_gpu_layers": settings.n_gpu_layers}
        return ScoringJob(t.label, "llama.cpp", str(export), engine, config, str(pairs_file), run_file,
                          progress=settings.progress, card=settings.card)
    if settings.weight_quant_backend == "vllm":
        return ScoringJob(t.label, "vllm", str(export), {"dtype": "float16"}, config, str(pairs_file), run_file,
                          python=settings.vllm_python, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                          progress=settings.progress, card=settings.card)
    return ScoringJob(t.label, "transformers", str(export), {"dtype": "auto", "device": "auto"}, config,
                      str(pairs_file), run_file, progress=settings.progress, card=settings.card)


def prefilter_job(settings: StudySettings, pairs_file: Path, runs: Path) -> ScoringJob:
    """The prefilter scores every pair (its results are the cascade points' documents below the cut, and its ranking
    decides which documents rank1's results are kept for)."""
    from rank1_local.pipeline.cascade import prefilter_config

    sweep = settings.sweep
    config = prefilter_config(settings.config.without_derived()).to_dict()
    engine: dict[str, Any] = {"parallel": settings.parallel, "threads": settings.threads,
                              "n_gpu_layers": settings.n_gpu_layers} if sweep.prefilter_backend == "llama.cpp" \
        else {"dtype": "auto", "device": "auto"}
    return ScoringJob("prefilter", sweep.prefilter_backend, str(sweep.prefilter), engine, config, str(pairs_file),
                      str(runs / "prefilter.jsonl"), progress=settings.progress)


def check_vllm_python(python: str | None) -> None:
    if python is not None and not Path(python).is_file():
        raise Rank1Error(f"--vllm-python {python}: no such Python (build vLLM's virtualenv as the README's Tests "
                         "section shows, or leave it out where vLLM is installed here)")


def has_module(module: str, python: str | None = None) -> bool:
    """Whether ``module`` can be imported here, or by the Python ``python`` (a quick look-up, nothing imported)."""
    if python is None:
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_reference(vllm_python: str | None) -> str:
    """``--reference`` left out: vLLM (the official engine) where it is installed, else transformers, said once."""
    if has_module("vllm", vllm_python):
        return "vllm"
    where = f"in {vllm_python}" if vllm_python else "here"
    logger.warning("vLLM is not installed %s: the reference is transformers (float16 on CUDA, float32 on the CPU); "
                   "--reference vllm with --vllm-python PYTHON uses vLLM's own virtualenv", where)
    return "transformers"


def check_engines(reference: str, types: list[StudyType], *, weight_quant_backend: str = "transformers",
                  vllm_python: str | None = None) -> None:
    """Every engine the study's scoring jobs run in this machine's Pythons is installed: checked before anything is
    read, written or exported, so a missing engine never stops a study hours in, after the exports."""
    weight_quant = any(not t.is_gguf for t in types)
    needs_vllm = reference == "vllm" or (weight_quant and weight_quant_backend == "vllm")
    if needs_vllm and not has_module("vllm", vllm_python):
        where = f"in {vllm_python}" if vllm_python else "in this Python"
        flag = "--reference vllm" if reference == "vllm" else "--weight-quant-backend vllm"
        raise Rank1Error(f"{flag}: vLLM is not installed {where}; give --vllm-python PYTHON (vLLM's own virtualenv, "
                         "see the README's Tests), or use --reference transformers (float16 on CUDA, float32 on the "
                         "CPU)")
    if reference == "transformers" or (weight_quant and weight_quant_backend == "transformers"):
        for module in ("torch", "transformers"):
            if not has_module(module):
                flag = "--reference transformers" if reference == "transformers" else "GPTQ/AWQ types"
                raise MissingExtraError(f"{flag} needs {module}, which is not installed: "
                                        f"{install_hint('reference', module)}")


def run_study(inputs: StudyInputs, settings: StudySettings, scorer: Scorer = subprocess_scorer) -> StudyRuns:
    """Export, score (resuming whatever is already there) and return where the runs are."""
    from rank1_local.models.hub import resolve_local_or_hub

    start = time.perf_counter()
    if scorer is subprocess_scorer:  # on Ray the workers run their cluster's Python, which this process cannot see
        check_engines(settings.reference, settings.types, weight_quant_backend=settings.weight_quant_backend,
                      vllm_python=settings.vllm_python)
    source = resolve_local_or_hub(settings.model)
    if not (source / "config.json").is_file():
        raise Rank1Error(f"{source}: not a Hugging Face checkpoint folder (no config.json); a study starts from the "
                         "source model, which it exports to each type")
    work = settings.work
    written = write_inputs(inputs, work / "inputs")
    check_state(work, {"inputs": written.digest, "source": source_fingerprint(source),
                       "config": settings.scoring_settings, "model": str(settings.model)})
    exports = export_all(settings.types, source, work / "exports", calibration=settings.calibration,
                         threads=settings.threads, progress=settings.progress, card=settings.card)
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    ref = reference_job(settings, source, written.pairs_file, runs)
    scorer(ref)
    run_files, calibration = {}, {}
    budget = calibration_budget(settings.config, settings.sweep)
    for t in settings.types:
        job = type_job(settings, t, exports[t.label], written.pairs_file, runs)
        scorer(job)
        run_files[t.label] = Path(job.run_file)
        if budget is not None:
            job = type_job(settings, t, exports[t.label], written.pairs_file, runs, budget)
            scorer(job)
            calibration[t.label] = Path(job.run_file)
    prefilter = None
    if settings.sweep.prefilter is not None:
        job = prefilter_job(settings, written.pairs_file, runs)
        scorer(job)
        prefilter = Path(job.run_file)
    return StudyRuns(written.pairs_file, written.qrels_file, Path(ref.run_file), run_files, exports, source,
                     time.perf_counter() - start, calibration, prefilter)


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def run_cost(run_file: Path, export: Path | None = None) -> Any:
    from benchmarks.study.analysis import RunCost
    from rank1_local.runs.run_header import header_path, read_header

    header = read_header(header_path(run_file))
    record = read_job_record(run_file)
    size = export_bytes(export) if export is not None else (header.model_bytes if header else None)
    return RunCost(model_bytes=size, pairs_per_second=header.pairs_per_second if header and header.seconds else None,
                   peak_rss_bytes=record.get("peak_rss_bytes"), backend=header.backend if header else None,
                   device=header.device if header else None)
