"""The `slm` entry point. One subcommand per module, imported only when it is run, so that
`slm --help` starts without importing torch.

Each command module defines `add_arguments(parser)` and `run(args) -> int | None`. A verb's
options are the fields of its config dataclass, made with `option(...)`: `add_config_arguments`
turns them into its flags, `config_from_args` back into the config, and `slm build` reads the
fields not marked `wired` as the recipe keys of its stage (slmkit.recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing

from slmkit.errors import UsageError, chat_template_error

# name -> (module, one-line help). The order is the pipeline's.
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("slmkit.pipeline", "run a recipe end to end: generate, prune, distill, eval, export"),
    "generate": ("slmkit.generate", "the teacher writes task data (best-of-N, filtered, deduplicated)"),
    "prune": ("slmkit.prune", "cut a smaller model out of the teacher by measured importance"),
    "distill": ("slmkit.distill", "train a student on the teacher's token distributions"),
    "eval": ("slmkit.evaluate", "score models side by side: task quality, benchmarks, safety, speed"),
    "export": ("slmkit.export", "write a GGUF file (f16 / q8_0 / q4_k_m / ...) and an Ollama Modelfile"),
    "serve": ("slmkit.serve", "OpenAI-compatible HTTP server with a web playground"),
    "chat": ("slmkit.chat", "chat with a model in the terminal"),
    "info": ("slmkit.info", "describe a model: architecture, parameters, size, tokenizer"),
    "models": ("slmkit.packaged", "list the models usable by name; `slm models install` installs them"),
}


def _top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: slm COMMAND [options]   (slm COMMAND --help for its options)",
        "",
        "Turn a large language model into a small task-specific one.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "MODEL is a Hugging Face folder, a .gguf file, a Hub id Org/Name[@revision], `default`",
              "(SmolLM2-135M-Instruct) or a packaged name (`slm models` lists them)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- config dataclasses

@dataclasses.dataclass(frozen=True)
class Check:
    """The values one option allows, whatever sets it (flag, recipe key, Python): `ok(value)`, and
    the words for them in an error ("at least 1"). None, an optional option's "not given", passes."""

    ok: typing.Callable[[typing.Any], bool]
    what: str


AT_LEAST_1 = Check(lambda v: v >= 1, "at least 1")
POSITIVE = Check(lambda v: v > 0, "positive")
NOT_NEGATIVE = Check(lambda v: v >= 0, "0 or more")
FRACTION = Check(lambda v: 0 <= v <= 1, "between 0 and 1")


def option(default=dataclasses.MISSING, help: str = "", type=None, wired: bool = False,
           flags: tuple[str, ...] | None = None, check: Check | None = None, **argparse_kw):
    """A field of a verb's config dataclass: its default, its `--help` text (the one place that
    text lives) and how the command line reads it. A field without a default is a required flag.

    type: what argparse converts the text with; default: the annotation when it is int or float.
        A bool field is a switch: `--X`, or `--no-X` when its default is True.
    wired: `slm build` sets it itself (model paths, data, task, device), so a recipe may not.
    flags: the command-line names instead of `--field-name`; a bare name makes it positional.
    check: the values it allows; `check_options` (the config's __post_init__) and the recipe
        loader (at the key's line, before any stage runs) both apply it.
    argparse_kw: the rest for add_argument (nargs, choices, metavar, action, const); `choices`
        also limit the recipe key.
    """
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "wired": wired,
                                                        "flags": flags, "check": check,
                                                        "argparse": argparse_kw})


def check_value(field: dataclasses.Field, value) -> str | None:
    """Why `value` is not allowed for the option `field` ("must be at least 1"), else None."""
    check = field.metadata.get("check")
    if check is None or value is None or check.ok(value):
        return None
    return f"must be {check.what}"


def check_options(config) -> None:
    """A UsageError naming the flag and its value for the first option whose `check` refuses it."""
    for f in dataclasses.fields(config):
        why = check_value(f, getattr(config, f.name))
        if why:
            flag = (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[0]
            raise UsageError(f"{flag} {getattr(config, f.name)}: {why}")


def _scalar(hint):
    """int for `int | None`, float for `float`; None (text) for anything else."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None)]
    return kinds[0] if kinds in ([int], [float]) else None


def add_config_arguments(parser, config) -> None:
    """One argument per field of the dataclass `config`, as its `option(...)` says."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        kw = {"help": meta["help"], **meta["argparse"]}
        flags = meta["flags"] or ((flag.replace("--", "--no-", 1),) if f.default is True else (flag,))
        positional = not flags[0].startswith("-")  # then argparse names it by its flag
        if hints[f.name] is bool:
            kw["action"] = "store_false" if f.default else "store_true"
        else:
            kw["type"] = meta["type"] or _scalar(hints[f.name])
            if f.default is not dataclasses.MISSING:
                kw["default"] = f.default
            elif not positional:
                kw["required"] = True
        parser.add_argument(*flags, **kw, **({} if positional else {"dest": f.name}))


def config_from_args(config, args):
    """The dataclass `config` built from parsed arguments (its validation runs here)."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})


def flag_error(e: ValueError, config, renamed: dict[str, str] | None = None) -> UsageError:
    """A range check's "NAME must be ..." (backends.check_sampling) as a UsageError that names the
    flag and its value; renamed: the check's NAME -> the config's field, where they differ."""
    name, why = str(e).split(" ", 1)
    name = (renamed or {}).get(name, name)
    return UsageError(f"--{name.replace('_', '-')} {getattr(config, name)}: {why}")


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, as an OSError or wrapped by a writer that does not keep the errno (safetensors)."""
    import errno

    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture it)
        pass


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"slm {command}", description=(module.__doc__ or help_).strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        from slmkit import __version__

        print(f"slmkit {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"slm: unknown command `{command}`; run `slm --help` for the list", file=sys.stderr)
        return 2
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv[1:])
        code = args._run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return int(code or 0)
    except BrokenPipeError:
        # the reader of stdout stopped early (`slm info X | head`): not an error worth a word;
        # 141 (128 + SIGPIPE) is what a tool killed by the closed pipe would report
        _silence_stdout()
        return 141
    except UsageError as e:
        print(f"slm {command}: error: {e}", file=sys.stderr)
        return UsageError.exit_code
    except Exception as e:
        if _disk_full(e):
            # the machine's fault, not the code's: say so in one line, and what survives
            from slmkit.models import cache_dir

            print(f"slm {command}: error: no space left on the disk ({e}); free some (converted "
                  f"GGUF files are cached in {cache_dir() / 'gguf'}) and rerun the same command: "
                  "finished stages and the last training checkpoint are kept", file=sys.stderr)
            return 1
        if not type(e).__module__.startswith("jinja2"):
            raise
        # a model's chat template failed where no caller named the model: still its fault, not ours
        print(f"slm {command}: error: {chat_template_error(None, e)}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print(f"\nslm {command}: interrupted; rerun the same command to resume where supported",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
