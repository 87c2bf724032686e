"""The one exception type that the CLI turns into a single clear line (no traceback)."""


class SmolthinkError(Exception):
    """A user-facing error: bad input, a missing model, a bad config. The message says what to do."""
