"""Result objects of the runtime, and the one place a result is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rank1_local.core.pairs import PreparedPair
from rank1_local.core.protocol import NO_SCORE


@dataclass(frozen=True)
class BudgetCut:
    """What a run with the smaller reasoning ``budget`` gives a pair whose chain did not close within it: the chain
    cut at ``budget`` tokens and answered as that run answers it (official: from the top 20 at the budget's last
    position when both answers are there, else the fallback; full: the fallback). ``n_tokens`` is ``budget``."""

    budget: int
    score: float
    reasoning: str
    forced: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Rank1Result:
    """One scored (query, passage) pair."""

    index: int  # position of the pair in the caller's input
    score: float  # P(" true") / (P(" true") + P(" false")) at the answer
    reasoning: str  # the model's reasoning chain (text before </think>)
    n_tokens: int  # tokens the model generated
    forced: bool  # reasoning did not close within the budget: the fallback forced the answer
    truncated: bool  # the passage was cut to fit the context
    passage_tokens_dropped: int
    n_prompt_tokens: int
    seconds: float  # wall time from the pair's start to its score
    too_long: bool = False  # the prompt did not fit the context: not run, score 0.5
    cached: bool = False  # served from the judgment cache (``seconds`` is then the lookup time)
    # ScoringConfig.derive_budgets: the smaller budgets this chain did not close within (None: none were asked)
    cuts: tuple[BudgetCut, ...] | None = None
    stage: str | None = None  # in a cascade, the stage that scored it ("prefilter", or the reranker's card name)

    @property
    def relevant(self) -> bool:
        return self.score > 0.5

    def at_budget(self, budget: int) -> Rank1Result:
        """This pair's result at a smaller reasoning budget derived from this generation: itself when its chain closed
        within ``budget`` tokens, else its cut at ``budget`` (which must be one of the derived budgets)."""
        if self.n_tokens <= budget:
            return dataclasses.replace(self, cuts=None)
        cut = next((c for c in self.cuts or () if c.budget == budget), None)
        if cut is None:
            raise ValueError(f"budget {budget} was not derived for this result (derived: "
                             f"{[c.budget for c in self.cuts or ()]}; its chain has {self.n_tokens} tokens)")
        return dataclasses.replace(self, score=cut.score, reasoning=cut.reasoning, n_tokens=budget, forced=cut.forced,
                                   cuts=None)


def judgment_fields(result: Rank1Result) -> dict[str, Any]:
    """What a result says beyond its score, by the names every output uses (run files, the CLI's json/jsonl, the
    server's ``return_reasoning``)."""
    return {"reasoning": result.reasoning, "n_tokens": result.n_tokens, "forced": result.forced,
            "truncated": result.truncated, "too_long": result.too_long, "cached": result.cached}


def result_dict(result: Rank1Result, **ids: Any) -> dict[str, Any]:
    """One result as a JSON-ready row: ``ids`` first (``qid``, ``docid``, ``rank`` … in the order given), then
    ``score``, ``relevant`` and :func:`judgment_fields`. The one place results become rows (CLI output, run files;
    the server's rows add :func:`judgment_fields` to their own shape), with the prompt's tokens (``n_prompt_tokens``:
    with ``n_tokens``, what the pair cost). A cascade's row says which ``stage`` scored it; a row of a run that derives
    smaller budgets keeps its ``cuts``."""
    row = {**ids, "score": result.score, "relevant": result.relevant, **judgment_fields(result),
           "n_prompt_tokens": result.n_prompt_tokens}
    if result.stage is not None:
        row["stage"] = result.stage
    if result.cuts is not None:
        row["cuts"] = [c.to_json() for c in result.cuts]
    return row


def cuts_from_json(value: Any) -> tuple[BudgetCut, ...]:
    """A run-file row's ``cuts`` (checked: a malformed one is a ValueError naming what is wrong)."""
    if not isinstance(value, list):
        raise ValueError("cuts must be a list")
    cuts = []
    for c in value:
        if not isinstance(c, dict) or set(c) != {"budget", "score", "reasoning", "forced"}:
            raise ValueError("a cut is {budget, score, reasoning, forced}")
        cuts.append(BudgetCut(int(c["budget"]), float(c["score"]), str(c["reasoning"]), bool(c["forced"])))
    return tuple(cuts)


def build_result(pair: PreparedPair, *, score: float, reasoning: str, n_tokens: int, forced: bool,
                 seconds: float, cached: bool = False, cuts: tuple[BudgetCut, ...] | None = None) -> Rank1Result:
    return Rank1Result(index=pair.index, score=float(score), reasoning=reasoning, n_tokens=n_tokens, forced=forced,
                       truncated=pair.truncated, passage_tokens_dropped=pair.passage_tokens_dropped,
                       n_prompt_tokens=len(pair.ids), seconds=seconds, too_long=pair.too_long, cached=cached,
                       cuts=cuts)


def too_long_result(pair: PreparedPair) -> Rank1Result:
    """The result of a pair whose prompt does not fit the context (the official code scores it 0.5)."""
    return build_result(pair, score=NO_SCORE, reasoning="", n_tokens=0, forced=False, seconds=0.0)


@dataclass(frozen=True)
class RunStats:
    pairs: int
    prompt_tokens: int  # prompt tokens actually evaluated (shared prefixes once)
    generated_tokens: int
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0
