"""The judgment cache: rank1 results remembered in SQLite, keyed by model file, settings and prompt."""
