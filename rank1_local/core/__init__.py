"""The pure core: protocol settings, prompt bytes, scoring rules, pairs, duplicates and results.

Nothing here does I/O or touches llama.cpp; every other layer builds on it.
"""
