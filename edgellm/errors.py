"""One exception type for every user-facing failure, so the CLI can print a single clear line."""


class EdgeLLMError(Exception):
    """A problem the user can act on: bad input, a missing file, a corrupt bundle, an over-long prompt."""
