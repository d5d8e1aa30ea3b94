"""User-facing errors: one line saying what is wrong, where, and what to do; exit code 2."""


class UsageError(Exception):
    """A mistake in the user's input (path, flag, file contents). The CLI prints it without a
    traceback and exits with code 2."""

    exit_code = 2


def where(path, line=None, key=None) -> str:
    """Format a location for an error message: `file:line`, optionally with the key."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if key is not None:
        loc += f" (key `{key}`)"
    return loc
