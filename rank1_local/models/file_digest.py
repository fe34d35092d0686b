"""SHA-256 of (large) model files, computed once and remembered by path, size and modification time.

A GGUF of several GiB takes seconds to hash; the memo (a small JSON file under :func:`user_dirs.home_dir`)
makes later calls instant. A file that changed (size or mtime) is hashed again. A memo that cannot be read or
written is ignored: the digest is then simply computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from rank1_local.runs.atomic import write_text_atomic
from rank1_local.runs.user_dirs import digest_memo_path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (no memo)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_digest(path: Path, memo: Path | None = None) -> str:
    """The hex SHA-256 of ``path``, from the memo when the file is unchanged since it was hashed."""
    memo = memo or digest_memo_path()
    key = _memo_key(path)
    known = _read_memo(memo).get(key)
    if isinstance(known, str):
        return known
    logger.info("hashing %s (once; remembered by path, size and mtime)", path.name)
    digest = sha256_file(path)
    _store(memo, key, digest)
    return digest


def remember_digest(path: Path, digest: str, memo: Path | None = None) -> None:
    """Record the SHA-256 of a file the caller has just written and hashed (e.g. while copying it), so that
    :func:`file_digest` does not read it again."""
    _store(memo or digest_memo_path(), _memo_key(path), digest)


def _store(memo: Path, key: str, digest: str) -> None:
    entries = _read_memo(memo)  # read again: another process may have added entries meanwhile
    entries = {k: v for k, v in entries.items() if Path(k.split("|", 1)[0]).exists()}
    entries[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps(entries, indent=0, sort_keys=True))
    except OSError as exc:
        logger.debug("cannot write the digest memo %s: %s", memo, exc)
