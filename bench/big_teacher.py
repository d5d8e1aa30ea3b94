"""The seed's jobs taught by a real teacher: `slm build` of grammar-big-teacher and
dialogsum-big-teacher (Qwen2.5-Coder-1.5B-Instruct teaches SmolLM2-135M), each beside the
students a user could get without it, trained and scored on the same lines:

- `CE only`: the same student, data and steps, learning the teacher's text alone (alpha_ce 1):
  what the teacher's top-k adds over its words.
- dialogsum: `tuned 135M (dialogsum.yaml)`: SmolLM2-135M fine-tuned on the same human summaries
  with recipes/dialogsum.yaml's tune_teacher settings, the bar the issue names.

and the scorecard of each build (quality beside each model's cost per query in llama.cpp; with
`--benchmarks DIR`, also every model's 0-shot score on the benchmark files there and what the
student gave up on them: the eval stage is given `bench:`, so its time includes them).

    make models                                             # the packaged 1.5B (~1 GB)
    make benchmarks                                         # ARC, PIQA, ... into data/benchmarks
    SLMKIT_DATA=../shared/data OMP_NUM_THREADS=1 python bench/big_teacher.py [--part validation]

`--part validation` while choosing settings, `test` (the default) for the numbers reported: a
build whose stages are done reruns only its eval stage. Writes
results/big_teacher/<date>-<commit>-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import packaged, results, scorecard  # noqa: E402
from slmkit.data import file_hash  # noqa: E402
from slmkit.recipe import load_recipe  # noqa: E402

RECIPES = ("grammar-big-teacher", "dialogsum-big-teacher")
DATA = {"grammar-big-teacher": "jfleg-dev.jsonl", "dialogsum-big-teacher": "dialogsum-dev.jsonl"}


def headline(metrics: dict, name: str) -> dict:
    key = metrics["headline"].split(".", 1)[1]
    entry = next(m for m in metrics["models"] if m["name"] == name)
    out = {"score": 100 * entry["task"][key]}
    paired = entry["task"].get("paired")
    if paired:
        out |= {"paired_vs_first": 100 * paired["diff"], "se": 100 * paired["se"]}
    return out


def build(name: str, part: str, runs: Path, from_stage: str | None = None,
          benchmarks: list[Path] | None = None) -> dict:
    """`slm build` with eval_part set to `part` (a copy of the recipe beside it, same run),
    from `from_stage` on when given (the stages before it are reused when done), the eval stage
    given `benchmarks` when there are any."""
    import yaml

    src = ROOT / "recipes" / f"{name}.yaml"
    doc = yaml.safe_load(src.read_text())
    doc["eval_part"] = part
    if benchmarks:
        doc["stages"]["eval"] = doc["stages"]["eval"] | {"bench": [str(b) for b in benchmarks]}
    copy = src.with_name(f".{name}-{part}.yaml")
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        row = results.run_slm(["build", copy, "--runs", runs]
                              + (["--from", from_stage] if from_stage else []), ROOT)
    finally:
        copy.unlink()
    manifest = json.loads((runs / name / "manifest.json").read_text())
    row["stage_seconds"] = {s: v.get("seconds") for s, v in manifest["stages"].items()}
    row["total_seconds"] = round(sum(v or 0 for v in row["stage_seconds"].values()), 1)
    return row


def arm(name: str, run: Path, part_file: Path, task: str, opts: dict, work: Path, label: str) -> dict:
    """Another student from the run's data: distill with `opts`, then scored beside the run's
    own student on the same part (the paired difference is the arm's minus the recipe's)."""
    out = work / f"{name}-{label.replace(' ', '-')}"  # one folder per recipe and arm
    data = run / "data" / opts.pop("data")
    args = ["distill", "--student", "default", "--data", data, "--task", task,
            "--out", out] + [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v)]
    # an arm learns nothing from the teacher: made once by these same arguments (and the same
    # data file), it is scored again, not trained again, when the recipe's build changes
    stamp = out / "bench-arm.json"
    made = {"args": [str(a) for a in args], "data": file_hash(data)}
    if stamp.is_file() and (out / "training_record.json").is_file() and json.loads(stamp.read_text()) == made:
        row = {"distill": {"reused": results.command_line(args, ROOT)}}
    else:
        row = {"distill": results.run_slm(args, ROOT, work)}
        if row["distill"]["exit"] == 0:
            stamp.write_text(json.dumps(made))
    report = work / f"eval-{out.name}"
    row["eval"] = results.run_slm(["eval", run / "student", out, "--names", f"student,{label}",
                                   "--task", task, "--data", part_file, "--split", "all",
                                   "--max-new-tokens", 96 if task == "grammar" else 80,
                                   "--out", report], ROOT, work)
    if row["eval"]["exit"] == 0:
        row |= headline(json.loads((report / "metrics.json").read_text()), label)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="test", choices=("validation", "test"))
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--only", choices=RECIPES, help="one recipe")
    ap.add_argument("--no-arms", action="store_true", help="the builds alone")
    ap.add_argument("--from", dest="from_stage", help="rerun each build from this stage on (slm build --from)")
    ap.add_argument("--benchmarks", type=Path, metavar="DIR",
                    help="score every model on the multiple-choice files in DIR too (make benchmarks: "
                         "data/benchmarks)")
    args = ap.parse_args()
    benchmarks = sorted(args.benchmarks.glob("*.jsonl")) if args.benchmarks else []
    if args.benchmarks and not benchmarks:
        print(f"bench/big_teacher.py: --benchmarks: no .jsonl file in {args.benchmarks} (make benchmarks)")
        return 2
    data = Path(os.environ.get("SLMKIT_DATA") or "data")
    if not packaged.installed("qwen2.5-coder-1.5b-instruct"):
        print("bench/big_teacher.py: skipped: qwen2.5-coder-1.5b-instruct is not installed (`make models`)")
        return 0
    runs = (ROOT / args.runs).resolve()
    work = runs / ".big_teacher"
    record, lines = {"part": args.part}, []
    for name in [args.only] if args.only else RECIPES:
        if not (data / DATA[name]).is_file():
            print(f"bench/big_teacher.py: {name} skipped: {DATA[name]} is not in {data} (SLMKIT_DATA)")
            continue
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        row = {"build": build(name, args.part, runs, args.from_stage, benchmarks)}
        if row["build"]["exit"] != 0:  # a failed build is a failure, never a row
            print(f"bench/big_teacher.py: {name}: slm build failed: {row['build'].get('error')}")
            return 1
        run = runs / name
        report = json.loads((run / "report" / "metrics.json").read_text())
        row["report"] = {m["name"]: headline(report, m["name"]) for m in report["models"]}
        row["copy"] = [100 * b["task"][report["headline"].split(".", 1)[1]]
                       for b in report.get("baselines") or []]
        card = run / "report" / "scorecard.json"
        row["scorecard"] = json.loads(card.read_text()) if card.is_file() else None
        if benchmarks:  # 0-shot, every model of the report (the scorecard has the student's change)
            # and the student's own starting point: what distillation took from it, not what the
            # smaller model never had
            base = work / f"bench-{name}-student-before"
            row["benchmarks_before"] = results.run_slm(
                ["eval", recipe.student, "--names", "student before distillation", "--bench", *benchmarks,
                 "--out", base], ROOT, work)
            models = report["models"] + (json.loads((base / "metrics.json").read_text())["models"]
                                         if row["benchmarks_before"]["exit"] == 0 else [])
            row["benchmarks"] = {m["name"]: {b: round(v, 1) for b, v in scorecard.outside(m).items()}
                                 | {"n": {b: r["n"] for b, r in m["benchmarks"].items()}}
                                 for m in models}
        part_file, task = run / "data" / f"{args.part}.jsonl", recipe.task.name
        if not args.no_arms:
            dist = dict(recipe.stages["distill"])
            ce = dist | {"alpha_ce": 1.0, "data": "combined.jsonl" if "unlabelled" in recipe.raw else "train.jsonl"}
            row["ce_only"] = arm(name, run, part_file, task, ce, work, "CE only")
            if name.startswith("dialogsum"):
                tuned = load_recipe(ROOT / "recipes" / "dialogsum.yaml").stages["tune_teacher"]
                row["tuned_135m"] = arm(name, run, part_file, task,
                                        dict(tuned) | {"alpha_ce": 1.0, "data": "train.jsonl"}, work,
                                        "tuned 135M (dialogsum.yaml)")
        record[name] = row
        zero, student = row["report"]["teacher (zero-shot)"]["score"], row["report"]["student"]["score"]
        lines.append(f"{name} ({args.part}): student {student:.1f} = {100 * student / zero:.0f} % of the "
                     f"zero-shot 1.5B's {zero:.1f}" + (f"; copy {row['copy'][0]:.1f}" if row["copy"] else "")
                     + "".join(f"; {k} {row[k]['score']:.1f}" for k in ("ce_only", "tuned_135m")
                               if k in row and "score" in row[k])
                     + f"; build {row['build']['total_seconds'] / 60:.0f} min"
                     + (f"; outside its job {row['scorecard']['headline'].split('outside its job ')[1]}"
                        if benchmarks and row["scorecard"] and "outside its job" in row["scorecard"]["headline"] else "")
                     + "".join(f"; benchmark average: {who} {row['benchmarks'][who]['average']:.1f}"
                               for who in ("teacher (zero-shot)", "student", "student before distillation")
                               if who in row.get("benchmarks", {})))
    for line in lines:
        print(line)
    if lines:
        results.write("big_teacher", record, " | ".join(lines), tag=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
