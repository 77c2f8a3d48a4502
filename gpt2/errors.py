"""The exceptions the CLI turns into a one-line message: UsageError exits 2, any other GPT2Error 1."""


class GPT2Error(Exception):
    """A problem the user can fix: the message names it and says how (no traceback is shown)."""


class UsageError(GPT2Error):
    """A bad argument or prompt (found before or after the model is loaded): exit status 2."""
