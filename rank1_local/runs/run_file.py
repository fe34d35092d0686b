"""Score a pairs file into a run file: rows appended as pairs finish, resumable, with a header.

Used by ``rank1-local rerank --pairs`` and by the reference runners in ``benchmarks/``, so every engine
writes the same format: JSONL rows ``{"qid","docid","score","relevant","reasoning","n_tokens","forced",
"truncated","too_long","cached"}`` plus ``OUT.header.json`` (see :mod:`rank1_local.runs.run_header`).

Everything that can be checked without the model is checked before it loads: the pairs file (every row), where
the output goes, and, when resuming, that the run file was started with this model and these settings (whether or
not it is complete) and that every row in it is intact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rank1_local.core.pairs import Pair
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import Rank1Result, result_dict
from rank1_local.runs.inputs import JsonlAppender, check_writable, done_keys, read_pairs
from rank1_local.runs.run_header import RunHeader, check_resume, header_path, path_bytes, start_run, write_header

logger = logging.getLogger(__name__)


def score_pairs_file(pairs_file: Path, output: Path, make_model: Callable[[], Reranker], *, model_arg: str,
                     backend: str, settings: dict[str, Any] | None = None, progress: bool = True) -> int:
    """Score the pairs of ``pairs_file`` not yet in ``output``; returns how many were scored now.

    ``settings``: the protocol settings the model will get (``ScoringConfig.to_dict()``), so that resuming a run file
    made with others is refused before the model loads."""
    rows = read_pairs(pairs_file)
    check_writable(output)
    existed = output.exists()
    if existed and output.stat().st_size:  # checked before the file is touched (a torn last line is cut below)
        check_resume(output, model=model_arg, backend=backend, settings=settings or {})
    done = done_keys(output)
    todo = [r for r in rows if (r.qid, r.docid) not in done]
    if done:
        logger.info("resuming %s: %d row%s kept, %d of %d pairs left to score", output, len(done),
                    "" if len(done) == 1 else "s", len(todo), len(rows))
    if not todo:
        logger.info("%s: all %d pairs are scored already", output, len(rows))
        return 0
    with make_model() as model:
        model_file = Path(getattr(model, "model_path", model_arg))
        header = start_run(output, RunHeader(
            model=model_arg, model_file=str(model_file), model_bytes=path_bytes(model_file), backend=backend,
            device=model.device, settings=model.score_settings()), resuming=bool(done))
        out = JsonlAppender(output)
        counts = {"pairs": 0, "tokens": 0, "cached": 0}
        start = time.perf_counter()
        try:
            with tqdm(total=len(todo), unit="pair", disable=not progress) as bar:
                def on_result(result: Rank1Result) -> None:
                    row = todo[result.index]
                    out.write(result_dict(result, qid=row.qid, docid=row.docid))
                    counts["pairs"] += 1
                    if result.cached:  # a cache hit generated nothing now
                        counts["cached"] += 1
                    else:
                        counts["tokens"] += result.n_tokens
                    bar.update(1)
                    postfix = {"cached": counts["cached"]} if counts["cached"] else {}
                    if counts["pairs"] > counts["cached"]:
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        postfix["tok_s"] = f"{counts['tokens'] / elapsed:.1f}"
                    bar.set_postfix(postfix, refresh=False)

                model.score_pairs([Pair(r.query, r.passage, r.instruction) for r in todo], on_result=on_result)
        finally:
            out.close()
            if counts["pairs"] == 0 and not existed:  # nothing was written: leave nothing behind
                output.unlink(missing_ok=True)
            else:
                header.add(counts["pairs"], time.perf_counter() - start, counts["tokens"])
                write_header(header_path(output), header)
    seconds = time.perf_counter() - start
    cached = f" ({counts['cached']} of them already judged, from the judgment cache)" if counts["cached"] else ""
    logger.info("%s: %d pairs scored in %.1f s%s", output, counts["pairs"], seconds, cached)
    return counts["pairs"]
