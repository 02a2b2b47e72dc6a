"""The one exception type a user ever sees.

Anything wrong with *input* (a file, a flag, a prompt) raises `MinislmError` with a
message that names the file or flag and says what is wrong. The CLI prints that
message as a single line and exits with status 2; it never shows a traceback for
these. Bugs in minislm itself are left as ordinary exceptions, so they do show one.
"""


class MinislmError(ValueError):
    """Bad input from the user: printed as one line by the CLI, exit status 2.

    A ValueError, so API callers can catch it as the usual "bad argument" error.
    """
