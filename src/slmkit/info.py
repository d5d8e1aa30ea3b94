"""Describe a model: architecture, parameters, shape, size on disk, chat template.

    slm info default
    slm info qwen2.5-coder-1.5b-instruct       # a packaged model, read from its GGUF header
    slm info Qwen/Qwen2.5-0.5B-Instruct        # a Hub id, from the local Hub cache
    slm info runs/demo/student --json
    slm info --list                            # the models usable by name (= slm models)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from slmkit import models
from slmkit.cli import add_config_arguments, config_from_args, option


@dataclass
class InfoConfig:
    """One `slm info` call; CLI flags are these names with dashes."""

    model: str | None = option(None, help="HF folder, .gguf file, Hub id Org/Name[@rev], `default` or a "
                               "packaged name", flags=("model",), nargs="?")
    trust_remote_code: bool = option(False, "allow a model folder that ships its own code (off by default)")


def add_arguments(p):
    add_config_arguments(p, InfoConfig)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the models usable by name (as `slm models`)")


def run(args) -> int:
    cfg = config_from_args(InfoConfig, args)
    if args.list:
        from slmkit import packaged

        args.action, args.names = "list", []
        return packaged.run(args)
    if cfg.model is None:
        raise models.UsageError("give a MODEL (a folder, .gguf file, Hub id or name), or --list")
    info = models.describe(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key.replace('_', ' '):<26}{value}")
    return 0
