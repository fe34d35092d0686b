"""Reading run files (``rank1-local rerank --output``, ``rank1-bench reference``) strictly, for comparison.

Every problem is an error naming the file and line: a missing or empty file, a malformed JSON line, a row
without the required fields or with a score outside [0, 1], a (qid, docid) that appears twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from rank1_local.core.errors import Rank1Error
from rank1_local.core.results import BudgetCut, cuts_from_json
from rank1_local.runs.inputs import read_jsonl
from rank1_local.runs.run_header import RunHeader, header_path, read_header

REQUIRED = ("qid", "docid", "score", "reasoning", "n_tokens", "forced")
Key = tuple[str, str]


@dataclass(frozen=True)
class RunRow:
    qid: str
    docid: str
    score: float
    reasoning: str
    n_tokens: int
    forced: bool
    n_prompt_tokens: int | None = None  # (rows written before rank1-local kept it: None)
    too_long: bool = False  # not run: the prompt did not fit the context
    cuts: tuple[BudgetCut, ...] | None = None  # a run that derives smaller budgets (ScoringConfig.derive_budgets)
    stage: str | None = None  # a cascade's row: the stage that scored it

    @property
    def relevant(self) -> bool:
        return self.score > 0.5

    def at_budget(self, budget: int) -> RunRow:
        """The row at a smaller budget derived from this generation (as :meth:`Rank1Result.at_budget`)."""
        if self.n_tokens <= budget:
            return replace(self, cuts=None)
        cut = next((c for c in self.cuts or () if c.budget == budget), None)
        if cut is None:
            raise Rank1Error(f"({self.qid}, {self.docid}): budget {budget} was not derived in this run (its chain has "
                             f"{self.n_tokens} tokens)")
        return replace(self, score=cut.score, reasoning=cut.reasoning, n_tokens=budget, forced=cut.forced, cuts=None)


@dataclass(frozen=True)
class Run:
    path: Path
    rows: dict[Key, RunRow]
    header: RunHeader | None

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".jsonl")

    def by_query(self) -> dict[str, dict[str, RunRow]]:
        out: dict[str, dict[str, RunRow]] = {}
        for (qid, docid), row in self.rows.items():
            out.setdefault(qid, {})[docid] = row
        return out


def _row(path: Path, n: int, data: dict) -> RunRow:
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise Rank1Error(f"{path}:{n}: missing field(s) {', '.join(missing)}")
    score = data["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
            or not 0.0 <= score <= 1.0:
        raise Rank1Error(f"{path}:{n}: score must be a number between 0 and 1, got {score!r}")
    if not isinstance(data["reasoning"], str):
        raise Rank1Error(f"{path}:{n}: reasoning must be a string")
    if isinstance(data["n_tokens"], bool) or not isinstance(data["n_tokens"], int) or data["n_tokens"] < 0:
        raise Rank1Error(f"{path}:{n}: n_tokens must be a non-negative integer")
    cuts = None
    if "cuts" in data:
        try:
            cuts = cuts_from_json(data["cuts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Rank1Error(f"{path}:{n}: cuts: {exc}") from None
    prompt_tokens, stage = data.get("n_prompt_tokens"), data.get("stage")
    if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)):
        raise Rank1Error(f"{path}:{n}: n_prompt_tokens must be an integer")
    return RunRow(str(data["qid"]), str(data["docid"]), float(score), data["reasoning"], data["n_tokens"],
                  bool(data["forced"]), prompt_tokens, bool(data.get("too_long", False)), cuts,
                  None if stage is None else str(stage))


def read_run(path: Path) -> Run:
    if not path.is_file():
        raise Rank1Error(f"{path}: no such run file")
    rows: dict[Key, RunRow] = {}
    first_line: dict[Key, int] = {}
    for n, data in read_jsonl(path):
        row = _row(path, n, data)
        key = (row.qid, row.docid)
        if key in rows:
            raise Rank1Error(f"{path}:{n}: duplicated (qid, docid) {key} (first on line {first_line[key]})")
        rows[key] = row
        first_line[key] = n
    if not rows:
        raise Rank1Error(f"{path}: empty run file (no rows)")
    return Run(path, rows, read_header(header_path(path)))
