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
HEADER_SUFFIX = ".header.json"
_PACKAGES = ("rank1-local", "llama-cpp-python", "transformers", "torch", "vllm", "gptqmodel")


def header_path(run_file: Path) -> Path:
    return run_file.with_name(run_file.name.removesuffix(".jsonl") + HEADER_SUFFIX)


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


# the type each header field must have when read back (a header edited by hand or damaged is refused, naming it)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "model_file": (str,), "model_bytes": (int,), "backend": (str,), "device": (str,),
    "settings": (dict,), "versions": (dict,), "pairs": (int,), "seconds": (int, float), "generated_tokens": (int,),
    "created": (str,), "format": (str,)}


def read_header(path: Path) -> RunHeader | None:
    """The run header at ``path`` (None when there is none); one that is not a header this version wrote is an error
    naming the file and the field."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as exc:
        raise Rank1Error(f"{path}: not a run header ({type(exc).__name__}: {str(exc)[:80]}); delete it and its run "
                         "file to start over") from None
    if not isinstance(data, dict):
        raise Rank1Error(f"{path}: not a run header (a JSON {type(data).__name__}, not an object)")
    data.pop("pairs_per_second", None)
    if "engine" in data:  # headers written before the words were settled: engine = backend, backend = device
        data["backend"], data["device"] = data.pop("engine"), data.get("backend")
    for name, types in _FIELD_TYPES.items():
        value = data.get(name)
        if name in data and (isinstance(value, bool) or not isinstance(value, types)):
            raise Rank1Error(f"{path}: not a run header: {name} is {json.dumps(value)[:40]}, expected "
                             f"{' or '.join('a number' if t is float else t.__name__ for t in types)}")
    try:
        return RunHeader(**data)
    except TypeError as exc:
        raise Rank1Error(f"{path}: not a run header ({exc})") from None


def write_header(path: Path, header: RunHeader) -> None:
    write_text_atomic(path, json.dumps(header.to_json(), indent=2, ensure_ascii=False) + "\n")


def _same_model(old: RunHeader, model: str, model_file: str | None = None) -> bool:
    """Whether ``model`` (what the user passes now; ``model_file``: the file it resolved to, once loaded) is the model
    the run file was started with: the same argument, or the same file by its real path (and size)."""
    if model_file is None and old.model == model:
        return True
    candidates = [Path(p).expanduser() for p in (model_file, model) if p]
    theirs = [Path(p).expanduser() for p in (old.model_file, old.model) if p]
    for here in candidates:
        if not here.exists():
            continue
        here = here.resolve()
        for there in theirs:
            if not there.exists():
                continue
            there = there.resolve()
            if there == here:
                return not here.is_file() or here.stat().st_size == old.model_bytes
            if here.is_dir() and there.parent == here:  # a bundle folder now, its GGUF in the header
                return there.stat().st_size == old.model_bytes
    return False


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) or len(value) < 60 else \
        json.dumps(value[:57] + "…", ensure_ascii=False)


def differences(old: RunHeader, *, model: str, backend: str, settings: dict[str, Any],
                model_file: str | None = None) -> list[str]:
    """What differs between a run file's header and the run about to resume it, one ``name: X in the file, Y now``
    per difference. Before loading (no ``model_file`` yet) only the settings named in ``settings`` are compared: the
    precision a backend picks is not known then; once loaded, every setting is."""
    out = []
    if not _same_model(old, model, model_file):
        out.append(f"model: {old.model_file or old.model} in the file, {model_file or model} now")
    if old.backend != backend:
        out.append(f"backend: {old.backend} in the file, {backend} now")
    for name, value in settings.items():
        if name not in old.settings:
            out.append(f"{name}: absent in the file, {_show(value)} now")
        elif old.settings[name] != value:
            out.append(f"{name}: {_show(old.settings[name])} in the file, {_show(value)} now")
    if model_file is not None:
        out += [f"{name}: {_show(value)} in the file, absent now" for name, value in old.settings.items()
                if name not in settings]
    return out


def check_resume(run_file: Path, *, model: str, backend: str, settings: dict[str, Any],
                 model_file: str | None = None) -> RunHeader | None:
    """The header of ``run_file`` when resuming it with this model, backend and settings is allowed (None when it
    has none); a :class:`Rank1Error` naming every difference otherwise."""
    path = header_path(run_file)
    old = read_header(path)
    if old is None:
        return None
    found = differences(old, model=model, backend=backend, settings=settings, model_file=model_file)
    if found:
        raise Rank1Error(f"{run_file} was started with another model or other settings ({'; '.join(found)}); "
                         f"write to a new --output file, or delete {run_file.name} and {path.name} to start over")
    return old


def start_run(run_file: Path, header: RunHeader, *, resuming: bool) -> RunHeader:
    """The header to keep updating for this run: ``header`` itself, or the existing one when resuming
    the same model and settings (anything else is refused)."""
    if not resuming:
        return header
    old = check_resume(run_file, model=header.model, backend=header.backend, settings=header.settings,
                       model_file=header.model_file)
    return header if old is None else old
