"""The one exception type users see: a short, one-line message, no traceback."""


class LowbitError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with code 2."""
