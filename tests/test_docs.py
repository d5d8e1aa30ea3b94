"""docs/: the generated CLI reference is current, and every flag of every verb is in it."""

from __future__ import annotations

import argparse

from slmkit import clidoc
from slmkit.cli import COMMANDS, build_parser


def test_cli_reference_is_current():
    assert clidoc.DOC.is_file(), f"docs/cli.md is missing; generate it: {clidoc.REGENERATE}"
    assert clidoc.DOC.read_text() == clidoc.render(), (
        f"docs/cli.md is stale (a flag, default or help changed); regenerate it: {clidoc.REGENERATE}")


def test_every_flag_of_every_verb_is_in_the_reference():
    text = clidoc.render()
    for command in COMMANDS:
        section = text.split(f"## slm {command}\n", 1)[1].split("\n## ", 1)[0]
        for action in build_parser(command)._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in section, f"slm {command} {flag} missing from docs/cli.md"


def test_the_check_mode_says_how_to_regenerate(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text("# old\n")
    assert clidoc.main(["--check", "--out", str(stale)]) == 1
    assert "python -m slmkit.clidoc" in capsys.readouterr().err
    assert clidoc.main(["--out", str(stale)]) == 0 and clidoc.main(["--check", "--out", str(stale)]) == 0
