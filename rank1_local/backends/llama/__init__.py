"""The llama.cpp backend: the ctypes engine, the continuous-batching scheduler, the thread that owns the context,
and the ``Rank1`` facade."""
