"""Error types shared by the runtime and the toolchain.

Every error a user can trigger with bad input derives from :class:`Rank1Error`, so the command-line
tools can print its message (which names the problem) instead of a traceback.
"""


class Rank1Error(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ModelNotFoundError(Rank1Error):
    """A model folder, file or hub id could not be found or downloaded."""


class UnsupportedModelError(Rank1Error):
    """The checkpoint or GGUF is not one rank1-local can handle (architecture, tokenizer, dtype)."""


class CorruptFileError(Rank1Error):
    """A file exists but its content is not what its name promises (truncated safetensors, not a GGUF…)."""
