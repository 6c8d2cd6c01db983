"""The one exception type for problems with the user's input.

Anything raised as `UserError` is printed by the CLI as a single line on stderr, with exit status 2 and no
traceback. Everything else is a bug in tinygemma and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing or corrupt file, an impossible configuration, a mismatched tokenizer, ..."""


def describe(error: BaseException) -> str:
    """An exception in a few words for a one-line message: its type and its message's first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
