"""``rank1-local serve``: rank1 behind a Cohere/Jina/TEI-compatible ``/v1/rerank`` endpoint (the ``server`` extra).

Import :mod:`rank1_local.server.app` only after checking the extra is installed (see ``rank1_local.cli.main``).
"""
