"""Resolve a model argument: a local path, or a Hugging Face hub id fetched with huggingface-hub.

Before any hub call, :func:`check_hub` decides at once whether the hub can be used: not with ``HF_HUB_OFFLINE=1``,
and not when its endpoint (``HF_ENDPOINT``, through the proxy if one is set) does not accept a TCP connection within
:data:`PROBE_TIMEOUT_S` seconds. Then only the local Hugging Face cache is read, with one log line saying so, instead
of huggingface-hub's retries with backoff (about 23 s) before the same outcome. When nothing is cached, the error
says so and shows the local-path route.
"""

from __future__ import annotations

import difflib
import logging
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rank1_local.core.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
PROBE_TIMEOUT_S = 2.0
FIXTURE_HINT = ("To see rank1-local work without the hub: `rank1-local demo` (a fixture model, not a rank1 model; no "
                "torch needed).")


@dataclass(frozen=True)
class HubAccess:
    """Whether to ask the hub at all, and if not, why (for messages)."""

    online: bool
    reason: str = ""


def looks_like_path(model: str) -> bool:
    """Whether ``model`` can only be meant as a file or folder: it ends in ``.gguf``, starts with ``.``, ``/`` or
    ``~``, has a path separator other than the one slash of ``owner/name``, or its ``owner`` part is a folder here
    (``bundles/rank1-0.5b-Q8_0`` with a ``bundles`` folder)."""
    text = str(model)
    return (text.lower().endswith(".gguf") or text.startswith((".", "/", "~")) or "\\" in text
            or text.count("/") != 1 or Path(text.split("/")[0]).is_dir())


def is_hub_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not looks_like_path(model) and not Path(model).expanduser().exists()


def missing_model(model: str, what: str = "file or folder") -> str:
    """The error for a model argument that is neither an existing path nor a hub id (``what``: what the command
    takes, e.g. "file or bundle folder"), with the names close to it in the folder it names, if any."""
    if looks_like_path(model):
        return f"{model}: no such {what}{nearby(model)}"
    return f"{model}: no such {what}, and not a hub id of the form owner/name"


def nearby(model: str) -> str:
    """``"; did you mean bundles/rank1-0.5b-Q8_0-Q8_0?"``: the entries of the folder ``model`` names that it is the
    start of, that start it, or that are spelled almost alike; "" when there are none (or no such folder)."""
    path = Path(model).expanduser()
    try:
        names = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))
    except OSError:
        return ""
    close = [n for n in names if n.startswith(path.name) or path.name.startswith(n)]
    close = close or difflib.get_close_matches(path.name, names, n=3, cutoff=0.75)
    if not close:
        return ""
    shown = [str(Path(model).parent / n) if Path(model).parent != Path(".") else n for n in close[:3]]
    return f"; did you mean {' or '.join(shown)}?"


def hub_is_offline() -> bool:
    """True when the user asked huggingface-hub to stay offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub URL huggingface-hub uses (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _address(url: str) -> tuple[str, int] | None:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _connect_address(url: str) -> tuple[str, int] | None:
    """Where a request to ``url`` first connects: the proxy for its scheme (unless bypassed), else its host."""
    target = _address(url)
    if target is None:
        return None
    scheme = urllib.parse.urlsplit(url).scheme
    proxy = urllib.request.getproxies().get(scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(target[0]):
        return _address(proxy if "://" in proxy else f"http://{proxy}")
    return target


def probe_endpoint(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url`` (or its proxy) opens within ``timeout`` seconds, else why not.

    The connection (name resolution included, which a socket timeout does not bound) runs in a daemon thread
    that is waited for at most ``timeout`` seconds."""
    address = _connect_address(url)
    if address is None:
        return f"{url!r} is not a URL with a host"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    host, port = address
    if not outcome:
        return f"{host}:{port} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{host}:{port}: {outcome[0]}"


def check_hub(timeout: float = PROBE_TIMEOUT_S) -> HubAccess:
    """Whether the hub may be asked: no with ``HF_HUB_OFFLINE=1`` or when its endpoint is unreachable (logged once:
    the local cache is used instead)."""
    if hub_is_offline():
        logger.info("HF_HUB_OFFLINE=1: using the local Hugging Face cache only")
        return HubAccess(False, "HF_HUB_OFFLINE=1")
    endpoint = hub_endpoint()
    problem = probe_endpoint(endpoint, timeout)
    if problem is None:
        return HubAccess(True)
    logger.warning("the Hugging Face hub %s cannot be reached (%s): using the local cache only", endpoint, problem)
    return HubAccess(False, f"{endpoint} cannot be reached: {problem}")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The local snapshot folder of a model repository's ``revision`` in the hub cache (no network), or None.

    Read from the cache's documented layout (``models--owner--name/refs/<revision>`` holds the commit,
    ``snapshots/<commit>/`` the files), so a partly downloaded repository is found too."""
    storage = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = storage / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    except OSError:
        return None
    snapshot = storage / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def snapshot_revision(path: Path) -> str | None:
    """The commit of a hub-cache snapshot folder (``…/snapshots/<commit>``), None for any other folder."""
    return path.name if path.parent.name == "snapshots" else None


def download_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the HF cache) the files of ``repo_id`` matching ``allow_patterns``."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelNotFoundError(f"huggingface-hub is required to download {repo_id}: {exc}") from None
    access = check_hub()
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns,
                                      local_files_only=not access.online))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such repository on the Hugging Face hub") from None
    except Exception as exc:  # network down, offline mode without cache, proxy errors …
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        plain_miss = type(exc) is LocalEntryNotFoundError and not access.online  # not cached: the reason says why
        why = access.reason if plain_miss else f"{type(exc).__name__}: {reason[:200]}"
        raise ModelNotFoundError(
            f"{repo_id}: no such file or folder here, and as a hub id it could not be fetched and is not in the local "
            f"cache ({why}).\nOn a connected machine run `hf download {repo_id}` (then copy ~/.cache/huggingface), "
            f"or pass a local folder or file instead of the hub id. {FIXTURE_HINT}") from None


def resolve_local_or_hub(model: str | Path, allow_patterns: list[str] | None = None,
                         what: str = "file or folder") -> Path:
    """A local path as given, or the local snapshot folder of a hub id (``what`` names the local kind in errors)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if is_hub_id(text):
        logger.info("resolving %s on the Hugging Face hub", text)
        return download_snapshot(text, allow_patterns)
    raise ModelNotFoundError(missing_model(text, what))
