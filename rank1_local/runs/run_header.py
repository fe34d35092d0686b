"""The small header file written beside every run file (``OUT.jsonl`` -> ``OUT.header.json``).

It records what produced the rows — model, backend, device, settings, library versions — and how fast
(pairs, seconds, tokens), accumulated over resumed runs. Resuming into a run file made by another model
or other settings is refused, so one file never mixes two runs.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rank1_local.core.errors import Rank1Error
from rank1_local.runs.atomic import write_text_atomic

FORMAT = "rank1-run/1"
_PACKAGES = ("rank1-local", "llama-cpp-python", "transformers", "torch", "vllm", "gptqmodel")


def header_path(run_file: Path) -> Path:
    return run_file.with_name(run_file.name.removesuffix(".jsonl") + ".header.json")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class RunHeader:
    model: str  # what the user passed (path or hub id)
    model_file: str  # the file or folder actually run
    model_bytes: int
    backend: str  # the library that ran the model: "llama.cpp" | "transformers" | "vllm"
    device: str  # where and how it ran, in words ("CPU", "GPU offload (24/24 layers)", "transformers cpu float32")
    settings: dict[str, Any]
    versions: dict[str, str] = field(default_factory=library_versions)
    pairs: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: str = FORMAT

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    def add(self, pairs: int, seconds: float, generated_tokens: int) -> None:
        self.pairs += pairs
        self.seconds += seconds
        self.generated_tokens += generated_tokens

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pairs_per_second"] = self.pairs_per_second
        return out


def path_bytes(path: Path) -> int:
    """Size of a model file, or of every file in a checkpoint folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def read_header(path: Path) -> RunHeader | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("pairs_per_second", None)
        if "engine" in data:  # headers written before the words were settled: engine = backend, backend = device
            data["backend"], data["device"] = data.pop("engine"), data["backend"]
        return RunHeader(**data)
    except (ValueError, TypeError) as exc:
        raise Rank1Error(f"{path}: not a run header ({exc})") from None


def write_header(path: Path, header: RunHeader) -> None:
    write_text_atomic(path, json.dumps(header.to_json(), indent=2, ensure_ascii=False) + "\n")


def start_run(run_file: Path, header: RunHeader, *, resuming: bool) -> RunHeader:
    """The header to keep updating for this run: ``header`` itself, or the existing one when resuming
    the same model and settings (anything else is refused)."""
    path = header_path(run_file)
    old = read_header(path) if resuming else None
    if old is None:
        return header
    for what, a, b in (("model", old.model_file, header.model_file), ("backend", old.backend, header.backend),
                       ("settings", old.settings, header.settings)):
        if a != b:
            raise Rank1Error(f"{run_file} was started with another {what} ({a!r}, now {b!r}); "
                             "write to a new --output file or delete the old one")
    return old
