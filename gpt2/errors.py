"""The one exception type the CLI turns into a one-line message and exit status 1."""


class GPT2Error(Exception):
    """A problem the user can fix: the message names it and says how (no traceback is shown)."""
