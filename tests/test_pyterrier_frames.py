"""PyTerrier frames the transformer must not turn into wrong values (quick tier: a real ``Rank1`` over the scripted
engine; the behaving fixture's PyTerrier pipelines are in tests/test_integrations.py)."""

from __future__ import annotations

import math

import pytest
from fake_engine import FakeEngine, scripted, scripted_rank1

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.reranker import Reranker

pytest.importorskip("pyterrier")
pd = pytest.importorskip("pandas")
from rank1_local.integrations.pyterrier import Rank1Transformer  # noqa: E402

pytestmark = pytest.mark.quick
CONFIG = ScoringConfig(max_think_tokens=64, n_ctx=512)


class Recording(Reranker):
    """A scripted ``Rank1`` that remembers the pairs each call scores."""

    def __init__(self) -> None:
        self.model = scripted_rank1(FakeEngine(scripted({"relevant": "\nYes.</think>"})), 2, CONFIG)
        self.config, self.pairs = CONFIG, []

    @property
    def device(self) -> str:
        return self.model.device

    def score_pairs(self, pairs, *, config=None, on_result=None):
        self.pairs += list(pairs)
        return self.model.score_pairs(pairs, config=config, on_result=on_result)

    def _close_backend(self) -> None:
        self.model.close()


@pytest.fixture
def recording():
    model = Recording()
    yield model
    model.close()


def test_each_row_is_scored_with_its_own_query(recording):
    frame = pd.DataFrame({"qid": ["q1", "q1", "q1"], "query": ["apples", "apples", "rewritten pears"],
                          "docno": ["a", "b", "c"], "text": ["a relevant doc", "an off doc", "a relevant doc"]})
    out = Rank1Transformer(recording)(frame)
    assert sorted((p.query, p.passage) for p in recording.pairs) == [
        ("apples", "a relevant doc"), ("apples", "an off doc"), ("rewritten pears", "a relevant doc")]
    assert len(out) == 3 and out["rank"].tolist() == [0, 1, 2] and set(out["qid"]) == {"q1"}


@pytest.mark.parametrize("column, value, message", [
    ("qid", math.nan, "1 rows have no qid"), ("qid", None, "1 rows have no qid"),
    ("query", math.nan, "1 rows have no query"), ("query", 42, "the query of row 1 is int, not text"),
])
def test_missing_ids_and_queries_are_refused_before_scoring(recording, column, value, message):
    frame = pd.DataFrame({"qid": ["q1", "q2"], "query": ["apples", "pears"], "docno": ["a", "b"],
                          "text": ["a relevant doc", "an off doc"]}).astype(object)
    frame.loc[1, column] = value
    with pytest.raises(Rank1Error, match=message):
        Rank1Transformer(recording)(frame)
    assert recording.pairs == []
