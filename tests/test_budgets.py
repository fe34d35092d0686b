"""Budgets from one generation (``ScoringConfig.derive_budgets``): the result at every smaller budget, derived from the
longest run's chain, equals a direct run at that budget — on scripted rows through the whole llama.cpp path (quick
tier: exactly, on both protocols, with the answer read from the top 20 at the cut and from the fallback, and a cut
whose fallback does not fit the context), and on the behaving fixture in llama.cpp and transformers (the same text,
|Δscore| ≤ 1e-3)."""

from __future__ import annotations

import dataclasses

import pytest
from fake_engine import FakeEngine, scripted, scripted_rank1

from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair

SCRIPTS = {  # passage -> the chain it writes (lengths 6 to 60 tokens): some close within a budget, some do not
    "short": "\nYes.</think> true",
    "mid": "\nThe passage is about fruit. It matches.</think> true",
    "long": "\nLet me think. The query asks about a car. The passage is about a boat. Different.</think> false",
    "nodot": "\nhmm hmm hmm hmm hmm hmm hmm hmm hmm hmm hmm hmm hmm hmm hmm hmm</think> false",
    "eos": "\nThe model stops here",
}
PASSAGES = [f"{key} passage" for key in SCRIPTS] + ["relevant mid passage", "relevant long passage"]
BUDGETS = (4, 8, 16, 24, 40)
LONGEST = 64


def run(config: ScoringConfig, *, background=(-20.0, -20.0), parallel=3, device=False):
    from fake_engine import DeviceEngine

    kind = DeviceEngine if device else FakeEngine
    engine = kind(scripted(SCRIPTS), background=background)
    with scripted_rank1(engine, parallel, config) as model:
        return model.score_pairs([Pair("q", p) for p in PASSAGES])


def timeless(results):
    return [dataclasses.replace(r, seconds=0.0) for r in results]


def same(derived, direct) -> None:
    fields = ("score", "reasoning", "n_tokens", "forced", "too_long", "truncated")
    assert [dataclasses.replace(d, cuts=None, seconds=0.0) for d in derived] == \
        [dataclasses.replace(d, seconds=0.0) for d in direct], [
        (i, f, getattr(a, f), getattr(b, f)) for i, (a, b) in enumerate(zip(derived, direct)) for f in fields
        if getattr(a, f) != getattr(b, f)]


@pytest.mark.quick
@pytest.mark.parametrize("protocol", ["official", "full"])
@pytest.mark.parametrize("background", [(-20.0, -20.0), (-9.0, -9.5)], ids=["fallback", "top20"])
def test_each_derived_budget_equals_a_direct_run_on_scripted_rows(protocol, background):
    """Every pair at every budget: the same score, chain, token count and forced flag as a run with that budget. The
    ``top20`` rows hold both answers at every position (the official protocol answers a cut chain from its last row);
    the ``fallback`` rows never do (the cut is answered after the fallback's prompt)."""
    config = ScoringConfig(max_think_tokens=LONGEST, n_ctx=512, protocol=protocol, derive_budgets=BUDGETS)
    longest = run(config, background=background)
    assert timeless(longest) == timeless(run(config, background=background, parallel=1))  # slots change nothing
    assert [dataclasses.replace(r, cuts=None) for r in timeless(longest)] == \
        timeless(run(dataclasses.replace(config, derive_budgets=()), background=background))  # its own results
    kinds = set()
    for budget in BUDGETS:
        direct = run(dataclasses.replace(config, max_think_tokens=budget, derive_budgets=()), background=background)
        derived = [r.at_budget(budget) for r in longest]
        same(derived, direct)
        kinds |= {("cut" if r.n_tokens > budget else "closed", d.forced) for r, d in zip(longest, derived)}
    from_top20 = protocol == "official" and background == (-9.0, -9.5)  # a cut answered at its last row, unforced
    assert ("closed", False) in kinds and ("cut", not from_top20) in kinds and ("cut", from_top20) not in kinds


@pytest.mark.quick
def test_derived_budgets_on_device_rows_and_a_fallback_longer_than_the_context():
    """Device rows (top 20 only: an answer row is evaluated again on the host) give the same cuts; a cut whose
    fallback prompt does not fit the context scores 0.5, forced, as a direct run's does."""
    config = ScoringConfig(max_think_tokens=LONGEST, n_ctx=145, derive_budgets=BUDGETS)  # prompts: 128-138
    longest = run(config, device=True)
    assert timeless(longest) == timeless(run(config))
    for budget in BUDGETS:
        same([r.at_budget(budget) for r in longest],
             run(dataclasses.replace(config, max_think_tokens=budget, derive_budgets=())))
    assert any(c.score == 0.5 and c.forced for r in longest for c in r.cuts)


@pytest.mark.quick
def test_derive_budgets_is_checked():
    for bad, words in (((64,), "between 1 and max_think_tokens - 1"), ((0, 8), "between 1"),
                       (("8",), "integers"), ("8,16", "a list")):
        with pytest.raises(Rank1Error, match=words):
            ScoringConfig(max_think_tokens=64, n_ctx=512, derive_budgets=bad)
    with pytest.raises(Rank1Error, match="rethink_rounds"):
        ScoringConfig(max_think_tokens=64, n_ctx=512, rethink_rounds=1, derive_budgets=(8,))
    config = ScoringConfig(max_think_tokens=64, n_ctx=512, derive_budgets=[16, 8, 16])
    assert config.derive_budgets == (8, 16) and config.to_dict()["derive_budgets"] == [8, 16]
    assert ScoringConfig(**config.to_dict()) == config and "derive_budgets" not in config.without_derived().to_dict()
    with pytest.raises(ValueError, match="not derived"):
        run(config)[2].at_budget(12)


@pytest.mark.parametrize("backend", ["llama.cpp", "transformers"])
def test_derived_budgets_equal_direct_runs_on_the_behaving_fixture(backend, fixture_dir, exported):
    """The behaving fixture's chains are 25 to 35 tokens: at 8 and 16 every chain is cut (answered after the
    fallback), at 32 some are, at 48 none is. Each budget's derived result has the direct run's text, token count and
    forced flag, and its score within 1e-3."""
    from benchmarks.quant_study import study_pairs
    from rank1_local import open_reranker

    model = exported("behaving", "F16") if backend == "llama.cpp" else fixture_dir("behaving")
    pairs = [Pair(p.query, p.passage) for p in study_pairs()[:16]]
    budgets = (8, 16, 32)
    config = ScoringConfig(max_think_tokens=48, n_ctx=256, derive_budgets=budgets)
    settings = {"parallel": 4, "threads": 2} if backend == "llama.cpp" else {"dtype": "float32", "device": "cpu"}
    with open_reranker(backend, model, config, **settings) as reranker:
        longest = reranker.score_pairs(pairs)
        direct = {b: reranker.score_pairs(pairs, config=dataclasses.replace(config, max_think_tokens=b,
                                                                            derive_budgets=()))
                  for b in budgets}
    cut = 0
    for budget in budgets:
        for r, d in zip(longest, direct[budget]):
            derived = r.at_budget(budget)
            assert (derived.reasoning, derived.n_tokens, derived.forced) == (d.reasoning, d.n_tokens, d.forced)
            assert abs(derived.score - d.score) <= 1e-3
            cut += r.n_tokens > budget
    assert cut >= 2 * len(pairs)  # budgets 8 and 16 cut every chain
    assert any(r.n_tokens <= 32 for r in longest) and all(r.n_tokens <= 48 for r in longest)
