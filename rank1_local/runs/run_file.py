"""Score a pairs file into a run file: rows appended as pairs finish, resumable, with a header.

Used by ``rank1-local rerank --pairs`` and by the reference runners in ``benchmarks/``, so every engine
writes the same format: JSONL rows ``{"qid","docid","score","relevant","reasoning","n_tokens","forced",
"truncated","too_long","cached"}`` plus ``OUT.header.json`` (see :mod:`rank1_local.runs.run_header`).

Everything that can be checked without the model is checked before it loads: the pairs file (every row), where
the output goes (:class:`~rank1_local.runs.run_output.RunOutput`: a regular file that is not an input, and no other
run writing it), and, when resuming, that the run file was started with this model and these settings (whether or
not it is complete) and that every row in it is intact. The header is written as soon as the model is loaded, before
the first row.
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
from rank1_local.runs.inputs import read_pairs
from rank1_local.runs.run_header import RunHeader, path_bytes
from rank1_local.runs.run_output import RunOutput

logger = logging.getLogger(__name__)


def score_pairs_file(pairs_file: Path, output: Path, make_model: Callable[[], Reranker], *, model_arg: str,
                     backend: str, settings: dict[str, Any] | None = None, progress: bool = True,
                     force_resume: bool = False) -> int:
    """Score the pairs of ``pairs_file`` not yet in ``output``; returns how many were scored now.

    ``settings``: the protocol settings the model will get (``ScoringConfig.to_dict()``), so that resuming a run file
    made with others is refused before the model loads. ``force_resume``: keep rows that have no header (see
    :class:`~rank1_local.runs.run_output.RunOutput`)."""
    rows = read_pairs(pairs_file)
    with RunOutput(output, [pairs_file], force_resume=force_resume) as run:
        run.check_resume(model=model_arg, backend=backend, settings=settings or {})
        todo = [r for r in rows if (r.qid, r.docid) not in run.done]
        if run.done:
            logger.info("resuming %s: %d row%s kept, %d of %d pairs left to score", output, len(run.done),
                        "" if len(run.done) == 1 else "s", len(todo), len(rows))
        if not todo:
            logger.info("%s: all %d pairs are scored already", output, len(rows))
            return 0
        with make_model() as model:
            model_file = Path(getattr(model, "model_path", model_arg))
            run.begin(RunHeader(model=model_arg, model_file=str(model_file), model_bytes=path_bytes(model_file),
                                backend=backend, device=model.device, settings=model.score_settings()))
            counts = {"pairs": 0, "tokens": 0, "cached": 0}
            start = time.perf_counter()
            with tqdm(total=len(todo), unit="pair", disable=not progress) as bar:
                def on_result(result: Rank1Result) -> None:
                    row = todo[result.index]
                    tokens = 0 if result.cached else result.n_tokens  # a cache hit generated nothing now
                    run.append([result_dict(result, qid=row.qid, docid=row.docid)], tokens=tokens)
                    counts["pairs"] += 1
                    counts["cached"] += result.cached
                    counts["tokens"] += tokens
                    bar.update(1)
                    postfix = {"cached": counts["cached"]} if counts["cached"] else {}
                    if counts["pairs"] > counts["cached"]:
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        postfix["tok_s"] = f"{counts['tokens'] / elapsed:.1f}"
                    bar.set_postfix(postfix, refresh=False)

                model.score_pairs([Pair(r.query, r.passage, r.instruction) for r in todo], on_result=on_result)
    seconds = time.perf_counter() - start
    cached = f" ({counts['cached']} of them already judged, from the judgment cache)" if counts["cached"] else ""
    logger.info("%s: %d pairs scored in %.1f s%s", output, counts["pairs"], seconds, cached)
    return counts["pairs"]
