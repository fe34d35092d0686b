"""SHA-256 of (large) model files, computed once and remembered while the file stays the same file.

A GGUF of several GiB takes seconds to hash; the memo (a small JSON file under :func:`user_dirs.home_dir`)
makes later calls instant. The digest decides integrity (bundles) and identity (judgment cache keys), so the memo
is keyed, as git's index is, on everything that tells a replaced or rewritten file: its real path, size, modification
time, status-change time (``ctime``, which ``touch`` cannot set back), device and inode. Any change, and the file is
hashed again. ``RANK1_LOCAL_VERIFY=always`` (``--verify always`` on the command line) hashes every time instead, for
those who trust no memo. A memo that cannot be read or written is ignored: the digest is then simply computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from rank1_local.core.errors import Rank1Error
from rank1_local.runs.atomic import write_text_atomic
from rank1_local.runs.user_dirs import digest_memo_path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22
VERIFY_ENV = "RANK1_LOCAL_VERIFY"
VERIFY_MODES = ("memo", "always")


def verify_mode() -> str:
    """``memo`` (default: hash a file once while it stays the same file) or ``always`` (hash it on every use), from
    ``$RANK1_LOCAL_VERIFY``."""
    mode = os.environ.get(VERIFY_ENV, "memo").strip().lower() or "memo"
    if mode not in VERIFY_MODES:
        raise Rank1Error(f"{VERIFY_ENV}={mode!r}: use one of {', '.join(VERIFY_MODES)}")
    return mode


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (no memo)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_dev}|{st.st_ino}"


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def file_digest(path: Path, memo: Path | None = None, *, rehash: bool | None = None) -> str:
    """The hex SHA-256 of ``path``, from the memo when it is still the same, unchanged file (unless ``rehash``; None:
    as ``$RANK1_LOCAL_VERIFY`` says). Raises ``OSError`` when the file cannot be read."""
    memo = memo or digest_memo_path()
    if rehash is None:
        rehash = verify_mode() == "always"
    key = _memo_key(path)
    if not rehash:
        known = _read_memo(memo).get(key)
        if isinstance(known, str):
            return known
    logger.info("hashing %s%s", path.name, "" if rehash else " (once; remembered while the file is unchanged)")
    digest = sha256_file(path)
    if _memo_key(path) == key:  # not changed while it was read
        _store(memo, key, digest)
    return digest


def remember_digest(path: Path, digest: str, memo: Path | None = None) -> None:
    """Record the SHA-256 of a file the caller has just written and hashed (e.g. while copying it), so that
    :func:`file_digest` does not read it again."""
    _store(memo or digest_memo_path(), _memo_key(path), digest)


def _store(memo: Path, key: str, digest: str) -> None:
    entries = _read_memo(memo)  # read again: another process may have added entries meanwhile
    here = key.split("|", 1)[0]
    entries = {k: v for k, v in entries.items()  # one entry per file: the latest
               if (there := k.split("|", 1)[0]) != here and Path(there).exists()}
    entries[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps(entries, indent=0, sort_keys=True))
    except OSError as exc:
        logger.debug("cannot write the digest memo %s: %s", memo, exc)
