"""One scoring job of a study, in its own process: ``python -m benchmarks.study.job JOB.json``.

Imports only the runtime (no scipy, no plotting), so that it runs in vLLM's own virtualenv too.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from rank1_local.backends import open_reranker
from rank1_local.cli.support import run_command
from rank1_local.core.config import ScoringConfig
from rank1_local.runs.run_file import score_pairs_file


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux, VmHWM: ``ru_maxrss`` would carry over the parent's peak across
    fork and exec (the study's own process, often larger than a small model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(usage if sys.platform == "darwin" else usage * 1024)  # bytes on macOS, KiB on Linux


def run_job(spec: dict) -> int:
    from benchmarks.study.scoring import record_session

    config = ScoringConfig(**spec["config"])
    run_file = Path(spec["run_file"])
    n = score_pairs_file(Path(spec["pairs_file"]), run_file,
                         lambda: open_reranker(spec["backend"], spec["model"], config, card=spec.get("card"),
                                               **spec["settings"]),
                         model_arg=spec["model"], backend=spec["backend"], progress=spec.get("progress", True))
    if n:
        record_session(run_file, n, peak_rss_bytes())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    args = argparse.Namespace(func=lambda _args: run_job(spec), quiet=not spec.get("progress", True))
    return run_command(args, "interrupted: this scoring job stopped")  # the study itself says what it keeps


if __name__ == "__main__":
    sys.exit(main())
