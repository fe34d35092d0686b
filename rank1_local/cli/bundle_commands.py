"""``rank1-local pull`` and ``rank1-local list``: bundles for offline and air-gapped machines."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rank1_local.cli.cache_commands import FORMATS, output_format
from rank1_local.cli.support import add_subcommand
from rank1_local.core.cards import CARDS
from rank1_local.models.local_models import LocalModel


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _cmd_pull(args: argparse.Namespace) -> int:
    from rank1_local.models.pull import pull

    bundle = pull(args.model, args.gguf_type, args.out, replace=args.force, link=args.link, card=args.card)
    checked = "verified" if bundle.verification else "no verification card"
    print(f"{bundle.path}\n  {bundle.type}, card {bundle.card}, {len(bundle.files)} file(s), "
          f"{_size(bundle.size)}, from "
          f"{bundle.source.describe()}, {checked}\n  use: rank1-local rerank --model {bundle.path} …  "
          "(copy the folder as it is to another machine)")
    return 0


def render_table(rows: list[LocalModel]) -> list[str]:
    header = ("KIND", "NAME", "TYPE", "CARD", "SIZE", "SOURCE", "PATH")
    cells = [header] + [(r.kind, r.name, r.type or "?", r.card or "-", _size(r.size) if r.size else "-",
                         r.source if not r.problem else f"DAMAGED: {r.problem}", str(r.path)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    return ["  ".join([*(c[i].ljust(widths[i]) for i in range(len(widths))), c[-1]]).rstrip() for c in cells]


def _cmd_list(args: argparse.Namespace) -> int:
    from rank1_local.models.local_models import local_models

    rows = local_models(args.folders, hub_cache=not args.no_hub_cache, verify=args.verify)
    if args.format == "json":
        print(json.dumps([{**asdict(r), "path": str(r.path)} for r in rows], indent=2, ensure_ascii=False))
    elif rows:
        print("\n".join(render_table(rows)))
    else:
        print("no local models (rank1-local pull MODEL makes a bundle)")
    return 0


def add_bundle_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``pull`` and ``list`` on ``rank1-local``'s subcommands."""
    p = add_subcommand(sub, "pull", help="fetch a GGUF into a self-contained bundle folder (GGUF + manifest with "
                                         "SHA-256) for offline and air-gapped use")
    p.add_argument("model", help="hub id publishing GGUF files (e.g. owner/rank1-7b-GGUF), or a local .gguf file "
                                 "(a checkpoint is exported with rank1-quantize gguf --bundle)")
    p.add_argument("--gguf-type", default=None,
                   help="GGUF type, matched exactly (F16 is not BF16; default Q8_0 up to 3B, else Q4_K_M; for a "
                        "local file, the type it declares)")
    p.add_argument("--type", dest="gguf_type", help=argparse.SUPPRESS)  # the flag's earlier name
    p.add_argument("--out", type=Path, default=None,
                   help="bundle folder (default: <name>-<TYPE> in the bundles folder, ~/.cache/rank1-local/bundles "
                        "or $RANK1_LOCAL_HOME/bundles)")
    p.add_argument("--card", default=None, metavar="|".join(CARDS),
                   help="the model card the manifest records, used whenever the bundle is opened (default: recognised "
                        "from the GGUF's metadata and names)")
    p.add_argument("--force", action="store_true", help="replace a different bundle already in --out")
    p.add_argument("--link", action="store_true",
                   help="hard-link the GGUF into the bundle instead of copying it (no extra disk space, but the "
                        "bundle then changes whenever the source file does)")
    p.set_defaults(func=_cmd_pull)

    p = add_subcommand(sub, "list", help="show local bundles and GGUF files (bundles folder, given folders, Hugging "
                                         "Face cache); no network")
    p.add_argument("folders", nargs="*", type=Path, help="more folders: bundles, or folders holding bundles and .gguf "
                                                         "files")
    p.add_argument("--format", type=output_format, choices=FORMATS, default="table", help="table or json")
    p.add_argument("--no-hub-cache", action="store_true", help="leave out the Hugging Face cache")
    p.add_argument("--verify", action="store_true",
                   help="hash every bundle file against its manifest (default: check that each is there, whole)")
    p.set_defaults(func=_cmd_list)
