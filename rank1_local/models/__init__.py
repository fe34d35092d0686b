"""Finding and checking model files: the hub, GGUF facts, bundles, pulls, local listings, file digests."""
