"""The ``rank1-local`` command line."""
