"""The CLI reference, docs/cli.md, generated from the parsers `slm` builds: every flag of every
verb with its default and help. The parsers are made from the verbs' config dataclasses
(`cli.option`), so the help text lives in one place and this page cannot drift from it; a test
fails when the page is stale.

    python -m slmkit.clidoc            # rewrite docs/cli.md (`make docs` does this)
    python -m slmkit.clidoc --check    # exit 1 when docs/cli.md differs from what the code says
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slmkit.cli import COMMANDS, build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
REGENERATE = "make docs   (or: python -m slmkit.clidoc)"


def _cell(text) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if isinstance(action, argparse._StoreTrueAction) else "on (the flag turns it off)"
    if action.default is None or action.default == argparse.SUPPRESS:
        return "-"
    if isinstance(action.default, (list, tuple)):
        return "`" + " ".join(map(str, action.default)) + "`" if action.default else "-"
    return f"`{action.default}`"


def _positional(action: argparse.Action) -> str:
    name = (action.metavar or action.dest).upper()
    return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(action.nargs, name)


def _names(action: argparse.Action) -> str:
    if not action.option_strings:  # positional
        name = action.metavar or action.dest
        return f"`{name.upper() if name == action.dest else name}`" + (
            " (repeatable)" if action.nargs in ("+", "*") else "")
    return ", ".join(f"`{s}`" for s in action.option_strings)


def verb_section(command: str) -> list[str]:
    parser = build_parser(command)
    _, one_line = COMMANDS[command]
    # our own usage line: argparse's wraps at the terminal's width and changes between Pythons
    positionals = [_positional(a) for a in parser._actions if not a.option_strings]
    lines = [f"## slm {command}", "", one_line[0].upper() + one_line[1:] + ".", "",
             f"    slm {command} {' '.join(positionals + ['[options]'])}", "",
             "| flag | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        what = _cell(action.help or "")
        if action.choices:
            what += f" Choices: {', '.join(f'`{c}`' for c in action.choices)}."
        lines.append(f"| {_names(action)} | {_default(action)} | {what} |")
    return lines + [""]


def stage_section() -> list[str]:
    """The recipe keys of each `slm build` stage: its verb's options minus the ones build wires."""
    import dataclasses

    from slmkit.recipe import CONFIGS, STAGES, _stage_api

    lines = ["## Recipe stage keys", "",
             "What each stage under `stages:` accepts: the options of its verb that `slm build` does",
             "not set itself, with the verb's defaults (recipes.md lists the few a stage changes).", "",
             "| stage | verb | keys |", "|---|---|---|"]
    verbs = {"generate": "generate", "label": "generate", "tune_teacher": "distill", "prune": "prune",
             "distill": "distill", "export": "export", "eval": "eval"}
    for stage in STAGES:
        keys = []
        for name, (field, _) in _stage_api(stage).items():
            value = field.default
            # YAML spelling: true/false; no default shown where there is none (None)
            value = str(value).lower() if isinstance(value, bool) else value
            default = "" if value in (dataclasses.MISSING, None) else f": `{value}`"
            keys.append(f"`{name}`{default}")
        lines.append(f"| `{stage}` | [slm {verbs[stage]}](#slm-{verbs[stage]}) "
                     f"(`{CONFIGS[stage][1]}`) | {', '.join(keys)} |")
    return lines + [""]


def render() -> str:
    lines = ["# CLI reference", "",
             "Generated from the options the verbs declare (`option(...)` fields of their config",
             f"dataclasses); do not edit by hand. Regenerate with `{REGENERATE}`.", "",
             "A recipe stage takes the same options as its verb, with `-` written `_` (`max_steps: 200`",
             "for `--max-steps 200`); the options `slm build` sets itself (models, data, task, output",
             "folder, device) are not recipe keys. See [recipes.md](recipes.md).", "",
             "Verbs: " + ", ".join(f"[{c}](#slm-{c})" for c in COMMANDS)
             + "; [recipe stage keys](#recipe-stage-keys)", ""]
    for command in COMMANDS:
        lines += verb_section(command)
    lines += stage_section()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slmkit.clidoc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DOC), help="where to write (default: docs/cli.md)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = p.parse_args(argv)
    text, out = render(), Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    from slmkit.models import atomic_write

    with atomic_write(out) as f:
        f.write(text)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
