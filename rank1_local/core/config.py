"""The protocol settings: one small validated object shared by every backend, CLI and run header.

In the spirit of vLLM's ``SamplingParams``: construct it once, it checks itself, and every error names the
setting. Engine knobs (threads, GPU layers, batch size, KV cache type) are not here: they change speed, not
scores, and live with each backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from rank1_local.core.errors import Rank1Error
from rank1_local.core.prompt import QUERY_PLACEHOLDER
from rank1_local.core.protocol import PROTOCOLS

MAX_BUDGET = 32768
OFFICIAL_BUDGET = 8192
OFFICIAL_CONTEXT = 16000
# room the forced answer needs beyond the budget: "\n" + the cut reasoning re-tokenized + "\n</think>"
FALLBACK_MARGIN = 24


@dataclass(frozen=True)
class ScoringConfig:
    """How a pair is scored. Two runs with equal configs (and the same model file) give the same scores.

    Args:
        max_think_tokens: reasoning budget per pair, in generated tokens (official: 8192).
        n_ctx: context per pair, prompt plus reasoning (official: 16000).
        prompt_template: dataset prompt in which ``FILL_QUERY_HERE`` is replaced by the query.
        rethink_rounds: budget forcing (our design; the official code's version does not run): the first
            ``rethink_rounds`` times the model closes its reasoning, ``</think>`` is replaced by ``\\nWait``.
        protocol: "official" (the official code's rules: stop strings, top-20 answer at the last generated
            position, fallback) or "full" (the answer read from the full distribution right after ``</think>``);
            see :mod:`rank1_local.core.protocol`.
        truncate_passages: cut passages (never the query) so that prompt + budget fit ``n_ctx``. Off by default,
            as in the official code: there a prompt longer than the context is not run and scores 0.5.
        derive_budgets: smaller reasoning budgets whose results are derived from this one generation (each between
            1 and ``max_think_tokens`` - 1): greedy decoding does not depend on the budget, so at a budget B a chain
            that closed within B tokens gives this run's result, and one that did not is cut at B and answered as a
            run with budget B would (:class:`~rank1_local.core.decoder.PairDecoder`; ``result.cuts``). They do not
            change this run's scores. Not with ``rethink_rounds`` (a rethink depends on the budget).
    """

    max_think_tokens: int = 1024
    n_ctx: int = 4096
    prompt_template: str | None = None
    rethink_rounds: int = 0
    protocol: str = "official"
    truncate_passages: bool = False
    derive_budgets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_think_tokens", "n_ctx", "rethink_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise Rank1Error(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.max_think_tokens <= MAX_BUDGET:
            raise Rank1Error(f"max_think_tokens must be between 1 and {MAX_BUDGET} (official: {OFFICIAL_BUDGET}), "
                             f"got {self.max_think_tokens}")
        if self.n_ctx <= self.max_think_tokens + FALLBACK_MARGIN:
            raise Rank1Error(f"n_ctx ({self.n_ctx}) leaves no room for a prompt next to a reasoning budget of "
                             f"{self.max_think_tokens} tokens: raise n_ctx above "
                             f"{self.max_think_tokens + FALLBACK_MARGIN} or lower max_think_tokens")
        if self.protocol not in PROTOCOLS:
            raise Rank1Error(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not isinstance(self.truncate_passages, bool):
            raise Rank1Error(f"truncate_passages must be true or false, got {self.truncate_passages!r}")
        if self.rethink_rounds < 0:
            raise Rank1Error(f"rethink_rounds must be 0 or more, got {self.rethink_rounds}")
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str):
                raise Rank1Error(f"prompt_template must be a string, got {type(self.prompt_template).__name__}")
            if QUERY_PLACEHOLDER not in self.prompt_template:
                raise Rank1Error(f"prompt_template must contain {QUERY_PLACEHOLDER!r} where the query goes, "
                                 f"got {self.prompt_template[:60]!r}")
        self._check_derive_budgets()

    def _check_derive_budgets(self) -> None:
        budgets = self.derive_budgets
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (tuple, list)):
            raise Rank1Error(f"derive_budgets must be a list of budgets, got {budgets!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) for b in budgets):
            raise Rank1Error(f"derive_budgets must be integers, got {list(budgets)!r}")
        outside = [b for b in budgets if not 1 <= b < self.max_think_tokens]
        if outside:
            raise Rank1Error(f"derive_budgets must lie between 1 and max_think_tokens - 1 "
                             f"({self.max_think_tokens - 1}): the generation runs at the largest budget and the others "
                             f"are derived from it; got {', '.join(map(str, outside))}")
        if budgets and self.rethink_rounds:
            raise Rank1Error("derive_budgets cannot go with rethink_rounds: whether a rethink happens depends on the "
                             "budget, so a smaller budget's chain is not a prefix of this one")
        # one order, one type: equal configs compare (and hash) equal
        object.__setattr__(self, "derive_budgets", tuple(sorted(set(budgets))))

    def fits(self, n_prompt_tokens: int) -> bool:
        """Whether a prompt of this many tokens can run: vLLM 0.7.2, the official code's pin, ran a prompt of up to
        ``n_ctx`` tokens and skipped a longer one, which then scores 0.5 (tests/official_judge.py)."""
        return n_prompt_tokens <= self.n_ctx

    def to_dict(self) -> dict[str, Any]:
        """The settings as written in run headers (resuming a run with other settings is refused); ``derive_budgets``
        only when there are some (headers without them read as they always have)."""
        out = asdict(self)
        if out["derive_budgets"]:
            out["derive_budgets"] = list(out["derive_budgets"])
        else:
            del out["derive_budgets"]
        return out

    def without_derived(self) -> ScoringConfig:
        """These settings without ``derive_budgets`` (what decides the scores of this run's own results)."""
        return replace(self, derive_budgets=()) if self.derive_budgets else self


S = TypeVar("S")


def split_settings(owner: str, config: ScoringConfig | None, settings: S | None, settings_type: type[S],
                   kwargs: dict[str, Any]) -> tuple[ScoringConfig, S]:
    """Let ``Owner(model, max_think_tokens=64, parallel=8)`` fill a :class:`ScoringConfig` and the backend's
    settings object from keyword arguments; unknown names and a setting given twice are errors."""
    config_names = {f.name for f in fields(ScoringConfig)}
    settings_names = {f.name for f in fields(settings_type)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - config_names - settings_names)
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword argument(s) {', '.join(unknown)}")
    config_kw = {k: v for k, v in kwargs.items() if k in config_names}
    settings_kw = {k: v for k, v in kwargs.items() if k in settings_names}
    if config is not None and config_kw:
        raise TypeError(f"{owner}(): give either config= or {', '.join(config_kw)}, not both")
    if settings is not None and settings_kw:
        raise TypeError(f"{owner}(): give either settings= or {', '.join(settings_kw)}, not both")
    return config or ScoringConfig(**config_kw), settings or settings_type(**settings_kw)
