"""Score a pairs file into a run file: rows appended as pairs finish, resumable, with a header.

Used by ``rank1-local rerank --pairs`` and by the reference runners in ``benchmarks/``, so every engine
writes the same format: JSONL rows ``{"qid","docid","score","relevant","reasoning","n_tokens","forced",
"truncated"}`` plus ``OUT.header.json`` (see :mod:`rank1_local.runs.run_header`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from rank1_local.core.pairs import Pair
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import Rank1Result
from rank1_local.runs.inputs import JsonlAppender, done_keys, read_pairs, result_row
from rank1_local.runs.run_header import RunHeader, header_path, path_bytes, start_run, write_header

logger = logging.getLogger(__name__)


def score_pairs_file(pairs_file: Path, output: Path, make_model: Callable[[], Reranker], *, model_arg: str,
                     backend: str, progress: bool = True) -> int:
    """Score the pairs of ``pairs_file`` not yet in ``output``; returns how many were scored now."""
    rows = read_pairs(pairs_file)
    done = done_keys(output)
    todo = [r for r in rows if (r.qid, r.docid) not in done]
    logger.info("%d pairs, %d already in %s, %d to score", len(rows), len(rows) - len(todo), output, len(todo))
    if not todo:
        return 0
    with make_model() as model:
        model_file = Path(getattr(model, "model_path", model_arg))
        header = start_run(output, RunHeader(
            model=model_arg, model_file=str(model_file), model_bytes=path_bytes(model_file), backend=backend,
            device=model.device, settings=model.score_settings()), resuming=bool(done))
        out = JsonlAppender(output)
        counts = {"pairs": 0, "tokens": 0}
        start = time.perf_counter()
        try:
            with tqdm(total=len(todo), unit="pair", disable=not progress) as bar:
                def on_result(result: Rank1Result) -> None:
                    row = todo[result.index]
                    out.write(result_row(row.qid, row.docid, result))
                    counts["pairs"] += 1
                    if not result.cached:  # generated in this run (a cache hit generated nothing)
                        counts["tokens"] += result.n_tokens
                    bar.update(1)
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix(tok_s=f"{counts['tokens'] / elapsed:.1f}")

                model.score_pairs([Pair(r.query, r.passage, r.instruction) for r in todo], on_result=on_result)
        finally:
            out.close()
            header.add(counts["pairs"], time.perf_counter() - start, counts["tokens"])
            write_header(header_path(output), header)
    return counts["pairs"]
