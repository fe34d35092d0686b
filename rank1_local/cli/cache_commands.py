"""``rank1-local cache stats|clear``, and the ``--cache [PATH]`` flag of the scoring commands."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rank1_local.cache.admin import CacheStats
from rank1_local.cache.store import JudgmentCache
from rank1_local.runs.user_dirs import default_cache_path


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    """``--cache [PATH]``: off unless given; the flag alone means the user cache directory's file."""
    p.add_argument("--cache", nargs="?", const="", default=None, metavar="PATH",
                   help="llama.cpp: reuse and keep judgments in a SQLite judgment cache (the flag alone: "
                        f"{default_cache_path()}); results are exact, since decoding is greedy")


def cache_path(args: argparse.Namespace) -> Path | None:
    """The judgment cache file chosen on the command line, or None when it is off."""
    value = getattr(args, "cache", None)
    if value is None:
        return None
    return Path(value).expanduser() if value else default_cache_path()


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def render_stats(stats: CacheStats) -> str:
    if not stats.exists:
        return f"{stats.path}: no judgment cache yet (made on first use)"
    lines = [f"cache   {stats.path}", f"size    {_size(stats.size_bytes)}", f"rows    {stats.rows}",
             f"models  {stats.models}", f"hits    {stats.hits}",
             f"oldest  {stats.oldest or '-'}", f"newest  {stats.newest or '-'}"]
    lines += [f"  model {digest}  {rows} rows" for digest, rows in stats.rows_per_model.items()]
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    stats = JudgmentCache(args.cache).stats()
    print(json.dumps(asdict(stats), indent=2) if args.format == "json" else render_stats(stats))
    return 0


def _model_digest(model: str) -> str:
    """A model digest from ``--model``: a GGUF file (hashed) or a digest as ``cache stats`` shows it."""
    from rank1_local.models.file_digest import file_digest

    path = Path(model).expanduser()
    return file_digest(path) if path.is_file() else model.lower()


def _cmd_clear(args: argparse.Namespace) -> int:
    cache = JudgmentCache(args.cache)
    model = _model_digest(args.model) if args.model is not None else None
    removed = cache.clear(model, force=args.force)
    which = f" of model {model}" if model is not None else ""
    print(f"removed {removed} judgment{'s' if removed != 1 else ''}{which} from {cache.path}")
    return 0


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="the judgment cache: stats, clear")
    commands = p.add_subparsers(dest="cache_command", required=True)
    stats = commands.add_parser("stats", help="size, rows, models and hits of the judgment cache")
    stats.add_argument("--cache", type=Path, default=None, metavar="PATH",
                       help=f"the cache file (default {default_cache_path()})")
    stats.add_argument("--format", choices=["text", "json"], default="text")
    stats.set_defaults(func=_cmd_stats)
    clear = commands.add_parser("clear", help="remove judgments (all, or one model's)")
    clear.add_argument("--cache", type=Path, default=None, metavar="PATH",
                       help=f"the cache file (default {default_cache_path()})")
    clear.add_argument("--model", default=None, metavar="GGUF|DIGEST",
                       help="remove only this model file's judgments (a .gguf path, or its digest from stats)")
    clear.add_argument("--force", action="store_true",
                       help="replace a file that is not a usable judgment cache (corrupt, not SQLite) with an "
                            "empty cache")
    clear.set_defaults(func=_cmd_clear)
