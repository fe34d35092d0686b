"""rank1 as a PyTerrier re-ranker (``pip install 'rank1-local[pyterrier]'``).

``Rank1Transformer`` is a ``pt.Transformer`` over PyTerrier's result frame: it takes ``qid, query, docno`` and the
passage column (``text``), and returns the frame with rank1's ``score`` and ``rank`` (PyTerrier's ranks: from 0 per
query, ties in input order), each query's rows best first, plus ``reasoning`` and ``forced`` columns. It fits a
pipeline the usual way::

    pipeline = bm25 % 100 >> pt.text.get_text(dataset, "text") >> Rank1Transformer("models/rank1-7b-Q4_K_M.gguf")

In process, the pairs of every query in the frame are scored in one call (they share the continuous batch); with
a server URL each query is one request, several in flight at once.

Compared with pyterrier_genrank's ``Rank1Reranker``: the same prompt and the official protocol (stop strings,
top-20 answer, the fallback for unclosed reasoning, 0.5 for a prompt over the context), checked here against vLLM,
the official engine; but run locally on llama.cpp (CPU or any GPU, GGUF files) instead of vLLM on a CUDA GPU, with
the reasoning chain and ``forced`` kept in the frame, the judgment cache, ``rethink_rounds`` that do not run down
across calls, and a running ``rank1-local serve`` as an alternative to loading the model in the notebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.extras import require
from rank1_local.core.reranker import Reranker
from rank1_local.integrations.client import Rank1Client, as_client

pt = require("pyterrier", "pyterrier", "the PyTerrier integration")
pd = require("pandas", "pyterrier", "the PyTerrier integration")

OUTPUT_COLUMNS = ("score", "rank", "reasoning", "forced")


class Rank1Transformer(pt.Transformer):
    """Re-rank a PyTerrier result frame with rank1.

    Args:
        model: a loaded ``Rank1`` (or other reranker), a model path, a ``rank1-local serve`` URL, or a
            :class:`~rank1_local.integrations.client.Rank1Client`.
        text_field: the frame's passage column (default ``text``, as ``pt.text.get_text`` names it).
        instruction: appended to the query as the official code does.
        config, api_key, cache, **model_settings: as for :class:`~rank1_local.integrations.client.Rank1Client`.
    """

    def __init__(self, model: Reranker | Rank1Client | str | Path, *, text_field: str = "text",
                 instruction: str | None = None, config: ScoringConfig | None = None, api_key: str | None = None,
                 cache: Any = None, **model_settings: Any) -> None:
        self.client = as_client(model, config=config, api_key=api_key, cache=cache, **model_settings)
        self.text_field, self.instruction = text_field, instruction

    def __repr__(self) -> str:
        return f"Rank1Transformer({self.client!r})"

    def transform(self, inp: Any) -> Any:
        """``inp`` (``qid, query, docno, <text_field>``) with ``score``, ``rank``, ``reasoning`` and ``forced``."""
        missing = [c for c in ("qid", "query", "docno", self.text_field) if c not in inp.columns]
        if missing:
            raise Rank1Error(f"Rank1Transformer needs the columns qid, query, docno and {self.text_field}; the frame "
                             f"has no {', '.join(missing)} (add the text with pt.text.get_text(...))")
        out = inp.drop(columns=[c for c in OUTPUT_COLUMNS if c in inp.columns]).reset_index(drop=True)
        if out.empty:
            return out.assign(score=pd.Series(dtype="float64"), rank=pd.Series(dtype="int64"),
                              reasoning=pd.Series(dtype="object"), forced=pd.Series(dtype="bool"))
        for column in ("qid", "query"):
            missing_rows = out.index[out[column].isna()]
            if len(missing_rows):
                raise Rank1Error(f"{len(missing_rows)} rows have no {column} (NaN or None; the first is row "
                                 f"{missing_rows[0]}): every row needs one")
        not_text = out.index[~out["query"].map(lambda q: isinstance(q, str))]
        if len(not_text):
            raise Rank1Error(f"the query of row {not_text[0]} is {type(out['query'].iloc[not_text[0]]).__name__}, "
                             "not text")
        # rows of one qid whose query differs (a rewritten query in some rows) are each scored with their own query
        groups = list(out.groupby(["qid", "query"], sort=False).indices.items())
        queries = []
        for (qid, query), rows in groups:
            texts = out[self.text_field].iloc[rows]
            if texts.isna().any():
                raise Rank1Error(f"query {qid}: {int(texts.isna().sum())} documents have no {self.text_field}")
            queries.append((query, [str(t) for t in texts]))
        judged = self.client.judge_queries(queries, instruction=self.instruction)
        score, reasoning, forced = [0.0] * len(out), [""] * len(out), [False] * len(out)
        for (_, rows), judgments in zip(groups, judged, strict=True):
            for row, j in zip(rows, judgments, strict=True):
                score[row], reasoning[row], forced[row] = j.score, j.reasoning, j.forced
        out = out.assign(score=score, reasoning=reasoning, forced=forced)
        out = pt.model.add_ranks(out)  # ranks from 0 per query, ties in input order (as Rank1.rerank)
        return out.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)

    def close(self) -> None:
        """Close the client (and the model, if it was loaded from a path here)."""
        self.client.close()
