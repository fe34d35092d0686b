"""GGUF file facts both packages need: the magic bytes, the ggml type ids we set, and a quick file check."""

from __future__ import annotations

import logging
from pathlib import Path

from rank1_local.core.errors import CorruptFileError, ModelNotFoundError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGML_TYPE_F32 = 0  # ggml_type of a float32 tensor (KV cache type in llama_context_params)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_gguf_file(path: Path) -> None:
    """Raise a clear error unless ``path`` is an existing GGUF file."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: is a folder, expected a .gguf file")
    if not is_gguf(path):
        raise CorruptFileError(f"{path}: not a GGUF file (wrong magic bytes)")

# llama.cpp's file types (``llama_ftype``) by the names GGUF files and llama-quantize use.
LLAMA_FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23,
    "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31,
    "BF16": 32,
}


def read_file_type(path: Path) -> str | None:
    """The type a GGUF file declares in its ``general.file_type`` metadata (``Q8_0``, ``BF16`` …), None when it
    declares none (or one we do not know)."""
    import gguf

    try:
        field = gguf.GGUFReader(path).get_field("general.file_type")
        value = int(field.contents()) if field is not None else None
    except (OSError, ValueError, TypeError, IndexError) as exc:
        logger.debug("cannot read general.file_type of %s: %s", path, exc)
        return None
    names = {v: k for k, v in LLAMA_FTYPES.items()}
    return names.get(value) if value is not None else None
