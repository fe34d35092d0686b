"""What a judgment is keyed by: ``sha256(domain, model digest, canonical settings JSON, full prompt)``.

Decoding is greedy, so the GGUF file, the settings that decide the numerics and the full prompt text determine the
whole result; equal settings give equal canonical JSON whatever their order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# v2: the engine facts name where the model runs ``device`` (v1 called it ``backend``); v1 entries are not hit
KEY_DOMAIN = b"rank1-local judgment v2\x00"


def canonical_settings(settings: Mapping[str, Any]) -> str:
    """The settings as canonical JSON (sorted keys, no spaces): equal settings give equal text."""
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class KeyMaker:
    """Keys of prompts under one (model digest, settings): the shared part is hashed once."""

    def __init__(self, model_digest: str, settings_json: str) -> None:
        self._prefix = hashlib.sha256(KEY_DOMAIN + model_digest.encode() + b"\x00" + settings_json.encode() + b"\x00")

    def key(self, prompt: str) -> str:
        h = self._prefix.copy()
        h.update(prompt.encode("utf-8", "surrogatepass"))
        return h.hexdigest()
