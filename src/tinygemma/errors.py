"""The one exception type for problems with the user's input.

Anything raised as `UserError` is printed by the CLI as a single line on stderr, with exit status 2 and no
traceback. Everything else is a bug in tinygemma and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing or corrupt file, an impossible configuration, a mismatched tokenizer, ..."""


def describe(error: BaseException, lines: int = 1) -> str:
    """An exception in a few words for a one-line message: its type and its message's first `lines` non-empty
    lines, joined by "; " (a validation error names what is wrong only on its second and third)."""
    kept = [line.strip() for line in str(error).splitlines() if line.strip()][:lines]
    return f"{type(error).__name__}: {'; '.join(kept)[:200 * lines]}" if kept else type(error).__name__
