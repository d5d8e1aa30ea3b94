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


def check_file(path, what: str = "file"):
    """The path as a Path when it names an existing file; else a UsageError saying whether it
    is missing or a folder. what: how the message names it, e.g. "data file", "--ppl"."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} `{path}` is a folder; give a file")
    if not path.is_file():
        raise UsageError(f"{what} `{path}` does not exist")
    return path


def read_text(path, what: str = "file") -> str:
    """A file's text, which must be UTF-8: other bytes are a UsageError naming the file, the
    line and the byte offset (a traceback from deep inside a reader tells the user nothing)."""
    raw = check_file(path, what).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); save the file as UTF-8") from None
