"""The error type for bad user input: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (a missing path, a corrupt file, an inconsistent option).

    The message must name the offending file, key or value; the CLI prints it without a traceback.
    """
