"""Which student should a grammar user start from? Three students learn from the same teacher
data at the same token budget: SmolLM2-135M (`default`: another tokenizer, cross-tokenizer KD),
Qwen2.5-Coder-0.5B-Instruct (the teacher's tokenizer) and the 1.5B teacher itself pruned to
about 0.5B (Minitron: its tokenizer and layers). Each is distilled from the top-k file of a
`grammar-big-teacher` build with the learning rate slm distill picks for its size, and scored
on the validation part of JFLEG dev (choosing a student is choosing a setting): GLEU, the
paired difference against `default` +- its standard error, time, peak memory and size.

    slm build recipes/grammar-big-teacher.yaml        # once: the teacher's corrections and top-k
    OMP_NUM_THREADS=1 python bench/students.py        # ~2 h here (--max-tokens 20000: 40 min)
    python bench/students.py --quick                  # the road runs (4000 tokens, 16 sentences);
                                                      # its numbers are printed, not recorded

Writes results/students/<date>-<commit>-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import packaged, results  # noqa: E402

TEACHER, SAME_TOKENIZER = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/grammar-big-teacher", help="the grammar-big-teacher build")
    ap.add_argument("--part", default="validation", choices=("validation", "test"))
    ap.add_argument("--max-tokens", type=int, default=60000, help="tokens each student reads")
    ap.add_argument("--prune-target", default="0.33", help="the pruned teacher's share of the 1.5B")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N sentences")
    ap.add_argument("--keep", action="store_true", help="keep the students (the scratch folder)")
    ap.add_argument("--quick", action="store_true", help="4000 tokens, 16 sentences, nothing recorded")
    args = ap.parse_args()
    if args.quick:
        args.max_tokens, args.limit = 4000, 16
    run = (ROOT / args.run).resolve()
    if not all(packaged.installed(n) for n in (TEACHER, SAME_TOKENIZER)):
        print("bench/students.py: skipped: the packaged Qwen models are not installed (`make models`)")
        return 0
    manifest = run / "manifest.json"
    label = json.loads(manifest.read_text())["stages"].get("label", {}) if manifest.is_file() else {}
    if label.get("status") != "done" or not label["outputs"].get("teacher_cache"):
        print(f"bench/students.py: skipped: no finished label stage in {args.run}; run "
              "`slm build recipes/grammar-big-teacher.yaml` first")
        return 0
    data, cache = (ROOT / label["outputs"][k] for k in ("data", "teacher_cache"))  # ROOT-relative
    scored = run / "data" / f"{args.part}.jsonl"
    work = Path(tempfile.mkdtemp(prefix="slmkit-students-"))
    rows = {}
    pruned = work / "pruned"
    rows["prune"] = results.run_slm(["prune", TEACHER, "--target", args.prune_target, "--task",
                                     "grammar", "--calib", data, "--out", pruned], ROOT, work)
    students = {"default": "default", SAME_TOKENIZER: SAME_TOKENIZER,
                f"{TEACHER} pruned to {args.prune_target}": pruned}
    outs = {}
    for i, (name, init) in enumerate(students.items()):
        out = work / f"student-{i}"
        rows[name] = results.run_slm(
            ["distill", "--student", init, "--teacher-cache", cache, "--data", data, "--task",
             "grammar", "--max-tokens", args.max_tokens, "--batch-size", 2, "--alpha-ce", 0.5,
             "--max-length", 256, "--eval-max", 8, "--out", out], ROOT, work)
        if rows[name]["exit"] == 0:
            outs[name] = out
            record = json.loads((out / "training_record.json").read_text())
            rows[name] |= {"lr": record["config"]["lr"], "parameters": record["parameters"],
                           "bytes": folder_bytes(out), "steps": record["steps"],
                           "final_eval": record["final_eval"]}
    report = work / "eval"
    names = list(outs)
    cmd = ["eval", *outs.values(), "--names", ",".join(names), "--task", "grammar", "--data", scored,
           "--split", "all", "--max-new-tokens", 96, "--batch-size", 8, "--out", report]
    rows["eval"] = results.run_slm(cmd + (["--limit", args.limit] if args.limit else []), ROOT, work)
    summary = "no student scored"
    if rows["eval"]["exit"] == 0:
        metrics = json.loads((report / "metrics.json").read_text())
        for entry in metrics["models"]:
            task = entry["task"]
            rows[entry["name"]] |= {"gleu": task["gleu"], "paired_vs_default": task.get("paired")}
        base = metrics.get("baselines") or []
        rows["copy the input"] = {"gleu": base[0]["task"]["gleu"]} if base else None
        summary = "; ".join(f"{n}: GLEU {100 * rows[n]['gleu']:.1f}" for n in names)
    for name in names:
        print(f"{name:<48} " + json.dumps({k: rows[name].get(k) for k in
                                          ("gleu", "paired_vs_default", "seconds", "peak_rss_gib", "lr")}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n in ("prune", *students, "eval") if rows.get(n, {}).get("exit") != 0]
    if failed:  # a student that did not finish is a failure, not a shorter table
        print(f"bench/students.py: failed: {', '.join(failed)} (see the errors above); nothing recorded")
        return 1
    if not args.quick:
        results.write("students", {"part": args.part, "max_tokens": args.max_tokens, "rows": rows,
                                   "data": label["outputs"]["data"]}, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
