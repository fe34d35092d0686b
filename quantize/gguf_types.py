"""GGUF output types: which we write ourselves and which go through llama.cpp's quantizer."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from rank1_local.core.errors import Rank1Error
from rank1_local.models.gguf_file import LLAMA_FTYPES

# Written directly by our exporter (numpy, no llama.cpp needed): name -> (tensor type, file type)
DIRECT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, int]] = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Produced by llama_model_quantize (llama.cpp's own quantizer): name -> llama_ftype
LLAMA_CPP_TYPES: dict[str, int] = {name: ftype for name, ftype in LLAMA_FTYPES.items() if name not in DIRECT_TYPES}

# llama.cpp refuses these without an importance matrix (their IQ3_XXS, 2-bit and smaller tensor types).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "IQ3_XXS"})
# The other i-quants run without one in llama.cpp, but they were designed around an importance matrix and lose
# more without it: refused unless the user says so (``allow_no_imatrix``).
MADE_FOR_IMATRIX = frozenset({"IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS"})


@dataclass(frozen=True)
class OutputType:
    name: str

    @property
    def direct(self) -> bool:
        return self.name in DIRECT_TYPES


def parse_types(spec: str | list[str], *, have_imatrix: bool = False,
                allow_no_imatrix: bool = False) -> list[OutputType]:
    """Parse ``"F16,Q8_0,q4_k_m"`` into output types, rejecting unknown names (and, when there is no importance
    matrix, the types that need one and — unless ``allow_no_imatrix`` — the i-quants made for one) up front."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().upper() for n in names if n.strip()]
    if not names:
        raise Rank1Error("no output types given (e.g. --types F16,Q8_0,Q4_K_M)")
    known = list(DIRECT_TYPES) + list(LLAMA_CPP_TYPES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise Rank1Error(f"unknown GGUF type(s): {', '.join(unknown)}; known: {', '.join(known)}")
    needs = [n for n in names if n in NEEDS_IMATRIX]
    if needs and not have_imatrix:
        raise Rank1Error(f"{', '.join(needs)} need(s) an importance matrix: add --imatrix auto (computed from rank1 "
                         "calibration prompts with the source model) or --imatrix FILE (llama-imatrix output)")
    made_for = [n for n in names if n in MADE_FOR_IMATRIX]
    if made_for and not have_imatrix and not allow_no_imatrix:
        raise Rank1Error(f"{', '.join(made_for)}: i-quants are made for an importance matrix: add --imatrix auto "
                         "or --imatrix FILE, or --allow-no-imatrix to quantize without one (lower quality)")
    return [OutputType(n) for n in dict.fromkeys(names)]
