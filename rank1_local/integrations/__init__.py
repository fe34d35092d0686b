"""rank1 inside other frameworks; each imports its framework lazily and names the extra that provides it."""
