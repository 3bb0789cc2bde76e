"""The one exception type library code raises for problems a user can cause or fix.

`cli.py` turns it into one red line on stderr and an exit code; nothing else catches it.
"""


class EraseError(Exception):
    """A failure the user can act on. The message says what went wrong and how to fix it."""

    exit_code = 1


class UsageError(EraseError):
    """Bad arguments or options (exit code 2, like Click's own usage errors)."""

    exit_code = 2
