"""The one exception type for expected user mistakes.

The CLI turns an `AdapterkitError` into a one-line message and exit code 2; anything else is a bug (exit 1).
"""


class AdapterkitError(Exception):
    """Bad input the user can fix: the message names the problem and the fix, on one line."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (the type name when it has none), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
