"""rank1-local: run rank1 reasoning rerankers locally with llama.cpp (or transformers / vLLM)."""

from rank1_local.api import Reranker
from rank1_local.backends.llama import LlamaSettings, Rank1
from rank1_local.config import ScoringConfig
from rank1_local.errors import Rank1Error
from rank1_local.pairs import Pair
from rank1_local.prompt import build_prompt, format_passage, format_query
from rank1_local.results import Rank1Result, RunStats

__all__ = ["LlamaSettings", "Pair", "Rank1", "Rank1Error", "Rank1Result", "Reranker", "RunStats", "ScoringConfig",
           "build_prompt", "format_passage", "format_query"]
__version__ = "0.1.0"
