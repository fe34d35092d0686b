"""rank1-local: run rank1 reasoning rerankers locally with llama.cpp (or transformers / vLLM).

The package is layered; each layer imports only the layers before it (``tests/test_architecture.py`` checks it):

- ``core``: the protocol settings, prompts, scoring rules, pairs and results (pure: no I/O, no llama.cpp);
- ``runs``: reading inputs, run files and their headers, atomic writes, user directories;
- ``models``: hub access, GGUF files, bundles, file digests;
- ``cache``: the judgment cache;
- ``pipeline``: the one path from input pairs to results (prepare, duplicates, cache, schedule, store, fan out);
- ``backends``: llama.cpp (engine, scheduler, the context's owner thread, the ``Rank1`` facade), transformers, vLLM;
- ``cli``, ``server``, ``integrations``: the ways in.
"""

from rank1_local.backends import open_reranker
from rank1_local.backends.llama.facade import LlamaSettings, Rank1
from rank1_local.core.cards import CARDS, ModelCard
from rank1_local.core.config import ScoringConfig
from rank1_local.core.errors import Rank1Error
from rank1_local.core.pairs import Pair
from rank1_local.core.prompt import build_prompt, format_passage, format_query
from rank1_local.core.reranker import Reranker
from rank1_local.core.results import Rank1Result, RunStats
from rank1_local.pipeline.cascade import Cascade
from rank1_local.version import __version__

__all__ = ["CARDS", "Cascade", "LlamaSettings", "ModelCard", "Pair", "Rank1", "Rank1Error", "Rank1Result", "Reranker",
           "RunStats", "ScoringConfig", "__version__", "build_prompt", "format_passage", "format_query", "open_reranker"]
