"""rank1 as an MTEB cross-encoder: the adapter's protocol handling (quick tier), and mteb's own evaluation of a
small local reranking task of real TREC RAG 2024 passages (full tier)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rank1_local import Rank1, ScoringConfig
from rank1_local.core.dataset_prompts import DATASET_PROMPTS
from rank1_local.core.pairs import PreparedPair, normalize_pairs
from rank1_local.core.prompt import format_passage, format_query
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import build_result
from rank1_local.integrations.mteb import MTEBRank1, pairs_from_batches

DATA = Path(__file__).parent / "data" / "trec_rag24_sample.jsonl"


class Recording(Reranker):
    """Scores every pair 0.25 and remembers what it was asked: the adapter's plumbing without a model."""

    device = "recording"

    def __init__(self) -> None:
        self.config = ScoringConfig(max_think_tokens=8, n_ctx=64)
        self.calls: list[tuple[ScoringConfig, list]] = []

    def score_pairs(self, pairs, *, config=None, on_result=None):
        pairs = normalize_pairs(pairs)
        self.calls.append((config or self.config, pairs))
        return [build_result(PreparedPair(i, "", "", []), score=0.25, reasoning="", n_tokens=0, forced=False,
                             seconds=0.0) for i in range(len(pairs))]

    def _close_backend(self) -> None:
        pass


@pytest.mark.quick
def test_batches_become_pairs_row_by_row():
    queries = [{"id": ["q1", "q2"], "text": ["a x", "b"], "query": ["a", "b"], "instruction": ["x", None]},
               {"id": ["q1"], "text": ["a x"], "query": ["a"], "instruction": ["x"]}]
    documents = [{"id": ["d1", "d2"], "text": ["T1 body one", "body two"]}, {"id": ["d3"], "text": ["three"]}]
    pairs = pairs_from_batches(queries, documents)
    assert [(p.query, p.passage, p.instruction) for p in pairs] == [("a", "T1 body one", "x"), ("b", "body two", None),
                                                                   ("a", "three", "x")]
    assert format_query(pairs[0].query, pairs[0].instruction) == "a x"  # the official instruction rule
    with pytest.raises(Exception, match="3 queries but 2 documents"):
        pairs_from_batches(queries, documents[:1])


@pytest.mark.quick
@pytest.mark.parametrize("task, subset, key", [("SciFact", "default", "SciFact"), ("BrightRetrieval", "aops",
                                               "BrightRetrieval_aops"), ("BrightRetrieval", "biology",
                                               "BrightRetrieval"), ("NQ", "default", None)])
def test_the_official_dataset_prompt_is_chosen_by_task_and_subset(task, subset, key):
    model = Recording()
    adapter = MTEBRank1(model)
    scores = adapter.predict([{"text": ["q"], "query": ["q"]}], [{"text": ["p"]}],
                             task_metadata=SimpleNamespace(name=task), hf_split="test", hf_subset=subset)
    assert scores.dtype == np.float64 and scores.tolist() == [0.25]
    (config, _), = model.calls
    assert config.prompt_template == (DATASET_PROMPTS[key] if key else None)
    assert model.config.prompt_template is None  # the loaded model's own settings are untouched
    assert MTEBRank1(model, dataset_prompts=False).predict([{"text": ["q"]}], [{"text": ["p"]}],
                                                           task_metadata=SimpleNamespace(name=task)).tolist() == [0.25]
    assert model.calls[-1][0].prompt_template is None


@pytest.mark.quick
def test_mteb_1x_tuples():
    model = Recording()
    assert MTEBRank1(model).predict([("q", "p"), ("q", {"title": "", "text": "p"}, "i")]).tolist() == [0.25, 0.25]
    assert format_passage(model.calls[0][1][1].passage) == " p"


def _local_task():
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]

    class TrecRag24Sample(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="TrecRag24Sample", type="Reranking", main_score="ndcg_at_10",
            description="12 judged TREC RAG 2024 pairs (3 topics), MS MARCO v2.1 passages cut to 60 words.",
            reference="https://trec-rag.github.io/", dataset={"path": "local", "revision": "1"}, category="t2t",
            eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-12-31"), dialect=["Written"],
            domains=["Web"], task_subtypes=[], license="mit", annotations_creators="expert-annotated",
            modalities=["text"], sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            queries = {r["qid"]: r["query"] for r in rows}
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
                corpus=Dataset.from_list([{"id": r["docid"], "text": r["text"], "title": ""} for r in rows]),
                relevant_docs={q: {r["docid"]: r["label"] for r in rows if r["qid"] == q} for q in queries},
                top_ranked={q: [r["docid"] for r in rows if r["qid"] == q] for q in queries})
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return TrecRag24Sample(), rows


def test_mteb_evaluates_rank1_on_a_local_reranking_task(exported, tmp_path):
    mteb = pytest.importorskip("mteb")
    task, rows = _local_task()
    config = ScoringConfig(max_think_tokens=16, n_ctx=512)
    with Rank1(exported("behaving", "F32"), config, parallel=4, threads=2) as model:
        result = mteb.evaluate(MTEBRank1(model, name="local/rank1-behaving"), task, cache=None,
                               prediction_folder=tmp_path, show_progress_bar=False)
        direct = model.score_pairs([(r["query"], r["text"]) for r in rows])
    (task_result,) = result.task_results
    scores = task_result.scores["test"][0]
    assert 0.0 <= scores["ndcg_at_10"] <= 1.0 and scores["main_score"] == scores["ndcg_at_10"]
    (predictions,) = list(tmp_path.rglob("*predictions*.json"))
    saved = json.loads(predictions.read_text())["default"]["test"]  # what mteb got from predict, per (qid, docid)
    got = {(q, d): s for q, docs in saved.items() for d, s in docs.items()}
    assert len(got) == len(rows)
    for row, r in zip(rows, direct, strict=True):
        assert got[(row["qid"], row["docid"])] == pytest.approx(r.score, abs=1e-6)
