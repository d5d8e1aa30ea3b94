"""User-facing errors: one line saying what is wrong, where, and what to do; exit code 2."""


class UsageError(Exception):
    """A mistake in the user's input (path, flag, file contents). The CLI prints it without a
    traceback and exits with code 2."""

    exit_code = 2


def chat_template_error(model, e: Exception) -> UsageError:
    """A model's chat template failed to render, e.g. a malicious one tripped the Jinja sandbox
    (SecurityError): the model folder is at fault, not the run. model: its path, or None."""
    whose = f"the chat template of `{model}`" if model else "a model's chat template"
    return UsageError(f"{whose} failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else 'no message'}); fix or replace "
                      "`chat_template` in its tokenizer_config.json or chat_template.jinja")


def where(path, line=None, key=None) -> str:
    """Format a location for an error message: `file:line`, optionally with the key."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if key is not None:
        loc += f" (key `{key}`)"
    return loc
