"""The one exception type that reaches users as a one-line message."""


class GatenormError(Exception):
    """A problem with the user's input (file, format, architecture, budget): shown as one line, exit 2."""
