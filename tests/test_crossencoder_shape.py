"""``Reranker.predict`` / ``Reranker.rank`` in the shape of sentence-transformers 6's ``CrossEncoder``: the same
parameters (checked against sentence-transformers' own signatures when it is installed, so drift is caught), one
pair alone giving one scalar, ``rank``'s list of dicts. The backend here scores by a rule (passage length), so the
API around ``score_pairs`` is what is tested; the real model's answers are checked in test_integrations and
test_runtime."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import pytest

from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair, normalize_pairs
from rank1_local.core.reranker import Reranker, is_single_pair
from rank1_local.core.results import Rank1Result

# the parameters we add to sentence-transformers' own: the protocol settings per call
OURS_ONLY = {"config"}


class LengthReranker(Reranker):
    """Scores a pair by its passage's length (tenths of a character), and records the calls it gets."""

    config = None
    device = "nowhere"

    def __init__(self) -> None:
        self.calls: list[tuple[list[Pair], object]] = []

    def score_pairs(self, pairs: Sequence[Pair | tuple], *, config=None, on_result=None) -> list[Rank1Result]:
        normalized = normalize_pairs(pairs)
        self.calls.append((normalized, config))
        out = []
        for i, p in enumerate(normalized):
            r = Rank1Result(i, len(p.passage) / 10, "", 0, False, False, 0, 0, 0.0)
            if on_result is not None:
                on_result(r)
            out.append(r)
        return out

    def _close_backend(self) -> None:
        pass


@pytest.mark.quick
def test_one_pair_gives_one_numpy_scalar():
    model = LengthReranker()
    score = model.predict(("q", "abc"))
    assert isinstance(score, np.float64) and score == 0.3
    assert model.predict(("q", "abcd", "an instruction")) == 0.4
    assert model.predict(Pair("q", "ab")) == 0.2
    assert model.predict(np.array(["q", "abcde"])) == 0.5
    assert model.predict(("q", "abc"), convert_to_numpy=False) == 0.3
    assert model.calls[1][0] == [Pair("q", "abcd", "an instruction")]


@pytest.mark.quick
def test_a_list_of_pairs_gives_an_array():
    model = LengthReranker()
    scores = model.predict([("q", "abc"), ["q", "a"], Pair("q", "ab", "i")])
    assert scores.dtype == np.float64 and scores.tolist() == [0.3, 0.1, 0.2]
    assert model.predict([("q", "abc")]).shape == (1,)  # a batch of one stays a batch
    assert model.predict([]).shape == (0,)
    assert model.predict([("q", "abc")], convert_to_numpy=False) == [0.3]
    assert model.predict(inputs=[("q", "ab")], batch_size=1, show_progress_bar=True, apply_softmax=True).tolist() \
        == [0.2]


@pytest.mark.quick
def test_rank_answers_as_sentence_transformers_does():
    model = LengthReranker()
    assert model.rank("q", ["a", "abc", "ab", "abc"]) == [
        {"corpus_id": 1, "score": 0.3}, {"corpus_id": 3, "score": 0.3}, {"corpus_id": 2, "score": 0.2},
        {"corpus_id": 0, "score": 0.1}]  # ties keep input order (a stable sort, as sentence-transformers')
    assert model.rank("q", ["a", "abc"], top_k=1, return_documents=True) == [
        {"corpus_id": 1, "score": 0.3, "text": "abc"}]


@pytest.mark.quick
def test_the_protocol_settings_pass_through():
    from rank1_local.core.config import ScoringConfig

    model = LengthReranker()
    config = ScoringConfig(max_think_tokens=8, n_ctx=512)
    model.predict(("q", "a"), config=config)
    model.rank("q", ["a"], config=config)
    assert [c for _, c in model.calls] == [config, config]


@pytest.mark.quick
@pytest.mark.parametrize("option", ["prompt", "prompt_name", "activation_fn", "device", "pool"])
def test_what_rank1_cannot_honour_is_refused_not_ignored(option):
    model = LengthReranker()
    for call in (lambda: model.predict(("q", "a"), **{option: "x"}), lambda: model.rank("q", ["a"], **{option: "x"})):
        with pytest.raises(Rank1Error, match=f"{option}=.... is not supported by rank1"):
            call()
    assert model.calls == []
    with pytest.raises(Rank1Error, match="batch_size must be a positive integer"):
        model.predict([("q", "a")], batch_size=0)


@pytest.mark.quick
def test_single_pair_detection_follows_sentence_transformers():
    assert is_single_pair(("q", "p")) and is_single_pair(["q", "p"]) and is_single_pair(Pair("q", "p"))
    assert not is_single_pair([("q", "p")]) and not is_single_pair([]) and not is_single_pair([Pair("q", "p")])
    assert is_single_pair(np.array(["q", "p"])) and not is_single_pair(np.array([["q", "p"]]))


def _parameters(function) -> list[inspect.Parameter]:
    return [p for name, p in inspect.signature(function).parameters.items() if name != "self"]


@pytest.mark.parametrize("method", ["predict", "rank"])
def test_signatures_match_sentence_transformers(method):
    """Every CrossEncoder parameter, in order, with its kind and default; ours adds only ``config=`` (keyword only)."""
    cross_encoder = pytest.importorskip("sentence_transformers").CrossEncoder
    theirs = _parameters(getattr(cross_encoder, method))
    ours = [p for p in _parameters(getattr(Reranker, method)) if p.name not in OURS_ONLY]
    assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]
    extra = [p for p in _parameters(getattr(Reranker, method)) if p.name in OURS_ONLY]
    assert [(p.name, p.kind, p.default) for p in extra] == [("config", inspect.Parameter.KEYWORD_ONLY, None)]


CALLS = {
    "predict": [((("q", "p"),), {}), (([("q", "p"), ("q", "r")],), {"batch_size": 8}),
                ((), {"inputs": [("q", "p")], "show_progress_bar": False, "convert_to_numpy": True}),
                (([("q", "p")], None, None, 16), {}), (([("q", "p")],), {"apply_softmax": False, "chunk_size": 4})],
    "rank": [(("q", ["p", "r"]), {}), (("q", ["p", "r"], 1, True), {}),
             ((), {"query": "q", "documents": ["p"], "top_k": 1, "return_documents": True, "batch_size": 4}),
             (("q", ["p"]), {"show_progress_bar": False, "chunk_size": 2})],
}


@pytest.mark.parametrize("method", ["predict", "rank"])
def test_sentence_transformers_calls_bind_and_run_on_ours(method):
    """The calls sentence-transformers' documentation makes bind to its signature and to ours alike, and ours answers
    them in its shape."""
    cross_encoder = pytest.importorskip("sentence_transformers").CrossEncoder
    model = LengthReranker()
    for args, kwargs in CALLS[method]:
        theirs = inspect.signature(getattr(cross_encoder, method)).bind(None, *args, **kwargs).arguments
        ours = inspect.signature(getattr(Reranker, method)).bind(model, *args, **kwargs).arguments
        assert {k: v for k, v in theirs.items() if k != "self"} == {k: v for k, v in ours.items() if k != "self"}
        out = getattr(model, method)(*args, **kwargs)
        if method == "rank":
            assert isinstance(out, list) and all(set(row) <= {"corpus_id", "score", "text"} for row in out)
        elif is_single_pair(theirs.get("inputs")):
            assert np.ndim(out) == 0
        else:
            assert isinstance(out, np.ndarray) and out.shape == (len(theirs["inputs"]),)


@pytest.mark.quick
@pytest.mark.parametrize("call, message", [
    (lambda m: m.rank("q", ["a", "b"], top_k=0), "top_k must be at least 1"),
    (lambda m: m.rank("q", ["a", "b"], top_k=1.5), "top_k must be at least 1"),
    (lambda m: m.rerank("q", ["a", "b"], top_k=-2), "top_k must be at least 1"),
    (lambda m: m.rank("q", "abc"), "documents must be a list of passages .* got one str"),
    (lambda m: m.rerank("q", "abc"), "documents must be a list of passages .* got one str"),
    (lambda m: m.rerank("q", {"text": "abc"}), "got one dict"),
    (lambda m: m.rank("q", 5), "got int"),
])
def test_bad_arguments_are_refused_before_anything_is_scored(call, message):
    """As the CLI refuses them: not after scoring everything (top_k=0 returned [], 1.5 a TypeError), and never a
    string scored letter by letter."""
    model = LengthReranker()
    with pytest.raises(Rank1Error, match=message):
        call(model)
    assert model.calls == []
