"""Describe a model: architecture, parameters, shape, size on disk, chat template.

    slm info default
    slm info runs/demo/student --json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from slmkit import models
from slmkit.cli import add_config_arguments, config_from_args, option


@dataclass
class InfoConfig:
    """One `slm info` call; CLI flags are these names with dashes."""

    model: str = option(help="HF folder, .gguf file, or `default`", flags=("model",))
    trust_remote_code: bool = option(False, "allow a model folder that ships its own code (off by default)")


def add_arguments(p):
    add_config_arguments(p, InfoConfig)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    cfg = config_from_args(InfoConfig, args)
    info = models.describe(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key.replace('_', ' '):<26}{value}")
    return 0
