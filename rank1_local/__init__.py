"""rank1-local: run rank1 reasoning rerankers locally with llama.cpp."""

from rank1_local.errors import Rank1Error
from rank1_local.prompt import build_prompt, format_passage, format_query

__all__ = ["Rank1Error", "build_prompt", "format_passage", "format_query"]
__version__ = "0.1.0"
