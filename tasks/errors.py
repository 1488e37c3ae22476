"""The one exception type a user is meant to read."""


class MedtransferError(Exception):
    """A problem with the user's input or configuration.

    The message says what was wrong and what to do about it; the CLI prints it without a
    traceback and exits non-zero. Anything else that escapes is a bug.
    """
