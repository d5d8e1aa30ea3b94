"""Describe a model: architecture, parameters, shape, size on disk, chat template.

    slm info default
    slm info runs/demo/student --json
"""

from __future__ import annotations

import json

from slmkit import models


def add_arguments(p):
    p.add_argument("model", help="HF folder, .gguf file, or `default`")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model folder that ships its own code (off by default)")


def run(args) -> int:
    info = models.describe(args.model, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key.replace('_', ' '):<26}{value}")
    return 0
