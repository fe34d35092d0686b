"""rank1 inside other frameworks; each imports its framework lazily and names the extra that provides it.

- ``client``: the one client under all of them (a loaded reranker, a model path, or a ``rank1-local serve`` URL);
- ``langchain``, ``llama_index``, ``haystack``, ``pyterrier``: each framework's reranker slot;
- ``mteb``: rank1 as an MTEB cross-encoder.
"""
