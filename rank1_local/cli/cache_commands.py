"""``rank1-local cache stats|clear``, and the ``--cache [PATH]`` flag of the scoring commands."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

from rank1_local.cache.admin import CacheStats
from rank1_local.cache.store import JudgmentCache
from rank1_local.cli.support import add_subcommand
from rank1_local.core.errors import Rank1Error
from rank1_local.runs.user_dirs import default_cache_path

FORMATS = ("table", "json")


def output_format(value: str) -> str:
    """``--format`` of the listing commands: table or json (``text``, an older name of table, is accepted)."""
    return "table" if value == "text" else value


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
    lines += [f"  model {stats.model_names.get(digest, '(name not recorded)')}  {digest}  {rows} "
              f"row{'s' if rows != 1 else ''}" for digest, rows in stats.rows_per_model.items()]
    return "\n".join(lines)


def _cmd_stats(args: argparse.Namespace) -> int:
    stats = JudgmentCache(args.cache).stats()
    print(json.dumps(asdict(stats), indent=2, ensure_ascii=False) if args.format == "json" else render_stats(stats))
    return 0


def _model_digest(model: str, cache: JudgmentCache) -> str:
    """A model digest from ``--model``: a GGUF file (hashed), a digest as ``cache stats`` shows it, or the file name
    ``cache stats`` shows beside it."""
    from rank1_local.models.file_digest import file_digest

    path = Path(model).expanduser()
    if path.is_file():
        return file_digest(path)
    if re.fullmatch(r"[0-9a-fA-F]{64}", model):
        return model.lower()
    named = [digest for digest, name in cache.stats().model_names.items() if name == model]
    if len(named) == 1:
        return named[0]
    if named:
        raise Rank1Error(f"{model}: {len(named)} models in {cache.path} were last seen under this name; pass the "
                         "digest `rank1-local cache stats` shows")
    raise Rank1Error(f"{model}: not a file, a SHA-256 digest, or a model name in {cache.path} "
                     "(`rank1-local cache stats` lists them)")


def _cmd_clear(args: argparse.Namespace) -> int:
    cache = JudgmentCache(args.cache)
    model = _model_digest(args.model, cache) if args.model is not None else None
    removed = cache.clear(model, force=args.force)
    which = f" of model {model}" if model is not None else ""
    print(f"removed {removed} judgment{'s' if removed != 1 else ''}{which} from {cache.path}")
    return 0


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(sub, "cache", help="the judgment cache: stats, clear")
    commands = p.add_subparsers(dest="cache_command", required=True)
    stats = add_subcommand(commands, "stats", help="size, rows, models (by the file name last seen and SHA-256) and "
                                                   "hits of the judgment cache")
    stats.add_argument("--cache", type=Path, default=None, metavar="PATH",
                       help=f"the cache file (default {default_cache_path()})")
    stats.add_argument("--format", type=output_format, choices=FORMATS, default="table", help="table or json")
    stats.set_defaults(func=_cmd_stats)
    clear = add_subcommand(commands, "clear", help="remove judgments (all, or one model's)")
    clear.add_argument("--cache", type=Path, default=None, metavar="PATH",
                       help=f"the cache file (default {default_cache_path()})")
    clear.add_argument("--model", default=None, metavar="GGUF|DIGEST",
                       help="remove only this model file's judgments (a .gguf path, or its name or digest as "
                            "`cache stats` shows them)")
    clear.add_argument("--force", action="store_true",
                       help="replace a file that is not a usable judgment cache (corrupt, not SQLite) with an "
                            "empty cache")
    clear.set_defaults(func=_cmd_clear)
