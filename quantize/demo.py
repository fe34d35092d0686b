"""``rank1-quantize demo`` (and ``rank1-local demo``): the whole path on this machine, with no hub and no torch.

It rebuilds the ``behaving`` fixture from the weights shipped in the repository (numpy:
:mod:`quantize.fixtures.numpy_build`), exports it to GGUF Q8_0 with our exporter, checks on llama.cpp that it reasons
and answers as trained, and reranks the README's three topic passages, saying what each step did and how long it
took. The fixture and its export are kept (in the fixture cache), so a second run only reranks. The first run needs
the package index once, for llama.cpp's tokenizer vocabulary files (:mod:`quantize.fixtures.vocab_files`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from quantize.fixtures.registry import FIXTURES, fixture_cache_dir, remove_leftovers
from rank1_local.core.errors import Rank1Error

FIXTURE = "behaving"
GGUF_TYPE = "Q8_0"
QUERY = "What is known about the apple?"
PASSAGES = [f"This passage describes the {word} in some detail." for word in ("apple", "tiger", "cherry")]
RECORD = "demo.json"
# the bar of the check on llama.cpp (the torch build's check asks the same of torch's greedy decoding)
MIN_EXACT, MIN_CORRECT = 0.95, 0.9
T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """The fixture's task on llama.cpp: its evaluation pairs, scored with the official protocol."""

    pairs: int
    exact_chains: int  # reasoning exactly as trained
    right_verdicts: int  # certain pairs on the right side of 0.5, unsure ones within 0.15 of their target

    @property
    def passed(self) -> bool:
        return self.exact_chains >= MIN_EXACT * self.pairs and self.right_verdicts >= MIN_CORRECT * self.pairs


def demo_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo keeps its export: beside the fixtures, under the fixture's cache key."""
    return (cache_dir or fixture_cache_dir()) / f"demo-{FIXTURES[FIXTURE].digest()}"


def _timed(what: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = what()
    return result, time.perf_counter() - start


def _step(number: int, name: str, text: str, seconds: float | None) -> None:
    took = f"  ({seconds:.1f} s)" if seconds is not None else ""
    print(f"{number}. {name:8s}{text}{took}", flush=True)


def check_on_llama_cpp(model: Any) -> Check:
    """Score the fixture's evaluation pairs (the ones its build is judged on) with ``model``: exact chains and
    verdicts."""
    from quantize.fixtures.synthetic_task import eval_pairs

    pairs = eval_pairs()
    results = model.score_pairs([(p.query, p.passage) for p in pairs])
    exact = sum(r.reasoning.strip() == p.reasoning.removesuffix("</think>").strip() for p, r in zip(pairs, results))
    right = sum(abs(r.score - p.target) < 0.15 if p.kind == "related" else (r.score > 0.5) == p.label
                for p, r in zip(pairs, results))
    return Check(len(pairs), exact, right)


def build_demo_model(folder: Path, *, progress: bool) -> dict[str, Any]:
    """Rebuild the fixture, export it and check it on llama.cpp, into ``folder`` (made whole, then renamed into
    place); returns its record."""
    from quantize.fixtures.numpy_build import build_checkpoint, parameter_count
    from quantize.gguf_export import export_gguf
    from rank1_local import Rank1

    cache_dir = folder.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(cache_dir)
    staging = cache_dir / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        checkpoint = staging / f"fixture-{FIXTURE}"
        digest, seconds = _timed(lambda: build_checkpoint(FIXTURE, checkpoint, cache_dir, progress=progress))
        _step(1, "fixture", f"rebuilt the {FIXTURE} fixture ({parameter_count(FIXTURE) / 1e6:.0f}M parameters, rank1's "
                            f"Qwen2 architecture and tokenizer) from its shipped weights with numpy; weights "
                            f"{digest[:12]}… as recorded", seconds)
        (result,), seconds = _timed(lambda: export_gguf(checkpoint, staging, GGUF_TYPE, progress=progress))
        shutil.rmtree(checkpoint)
        _step(2, "export", f"exported it to GGUF {GGUF_TYPE} with rank1-quantize's exporter (torch-free): "
                           f"{result.n_bytes / 1e6:.1f} MB", seconds)
        with Rank1(result.path, max_think_tokens=64, n_ctx=512, parallel=8) as model:
            check, seconds = _timed(lambda: check_on_llama_cpp(model))
        _step(3, "check", f"scored its {check.pairs} evaluation pairs on llama.cpp: {check.exact_chains} reasoning "
                          f"chains exactly as trained, {check.right_verdicts} right verdicts", seconds)
        if not check.passed:
            raise Rank1Error(f"the {FIXTURE} fixture does not behave as trained on this machine's llama.cpp ({check}); "
                             "this is a bug to report, with this machine's CPU and llama-cpp-python version")
        record = {"fixture": FIXTURE, "weights_sha256": digest, "gguf": result.path.name, "type": GGUF_TYPE,
                  "check": asdict(check), "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


@contextmanager
def _narrated(*loggers: str) -> Iterator[None]:
    """The demo's own lines say what each step did: these loggers' INFO lines (the exporter's "wrote …" of a staging
    path, "loaded …") would say it again."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(max(logging.WARNING, levels[name]))
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_demo(*, progress: bool = True, cache_dir: Path | None = None) -> int:
    """Build (or reuse) the demo model, rerank the three topic passages with it, and print each step."""
    with _narrated("quantize.gguf_export", "rank1_local.backends.llama.facade"):
        return _run_demo(progress, cache_dir)


def _run_demo(progress: bool, cache_dir: Path | None) -> int:
    from rank1_local import Rank1
    from rank1_local.cli.output import print_results

    folder = demo_dir(cache_dir)
    print("rank1-local demo: a fixture, a tiny model with rank1's architecture and real tokenizer trained on a "
          "synthetic task (topic words); it is not a rank1 model, its scores say nothing about real passages.",
          flush=True)
    record_file = folder / RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        _step(1, "fixture", f"reused: built {record['built']} from the {FIXTURE} fixture's shipped weights", None)
        _step(2, "export", f"reused: {folder / record['gguf']}", None)
        check = Check(**record["check"])
        _step(3, "check", f"passed when built: {check.exact_chains} of {check.pairs} chains exactly as trained, "
                          f"{check.right_verdicts} right verdicts", None)
    else:
        record = build_demo_model(folder, progress=progress)
    gguf = folder / record["gguf"]

    def rerank() -> tuple[list, str]:
        with Rank1(gguf, max_think_tokens=1024, n_ctx=4096) as model:  # rank1-local rerank's defaults
            return model.rerank(QUERY, PASSAGES), model.device

    (results, device), seconds = _timed(rerank)
    _step(4, "rerank", f"{QUERY!r} over {len(PASSAGES)} passages on llama.cpp ({device}), the official protocol", seconds)
    print(flush=True)
    print_results(results, [str(i) for i in range(len(PASSAGES))], PASSAGES, "table")
    sys.stdout.flush()
    print("\nSame word: relevant; same category (fruit): trained to be unsure; another category: not relevant.\n"
          f"The same with the command line: rank1-local rerank --model {gguf} --query {QUERY!r} --docs FILE\n"
          "For a real rank1 model, export one from the hub once: rank1-quantize gguf jhu-clsp/rank1-0.5b --out "
          "models --types Q8_0 (see the README).")
    return 0
