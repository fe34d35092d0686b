"""Calibration prompts: rank1 prompts over real queries and MS MARCO passages (TREC RAG 2024).

The packaged file holds 32 (query, passage) pairs, one per topic, with passages cut to 120 words;
see benchmarks/README for where the full set comes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rank1_local.prompt import build_prompt

PACKAGED = "calibration_trec_rag24.jsonl"


@dataclass(frozen=True)
class CalibrationPair:
    qid: str
    docid: str
    query: str
    text: str

    @property
    def prompt(self) -> str:
        return build_prompt(self.query, self.text)


def load_calibration(path: Path | None = None, limit: int | None = None) -> list[CalibrationPair]:
    if path is None:
        raw = resources.files("quantize.data").joinpath(PACKAGED).read_text(encoding="utf-8")
    else:
        raw = Path(path).read_text(encoding="utf-8")
    pairs = []
    for line in raw.splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append(CalibrationPair(str(row["qid"]), str(row["docid"]), row["query"], row["text"]))
    return pairs[:limit] if limit else pairs
