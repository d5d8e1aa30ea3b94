"""One row of the demo's student table: prune a (tuned) teacher to a shape, distil it on a
preset (`summarize` unless --task says), and score the task's metric on the preset's held-out
split (ROUGE-L on summarize's 40 conversations).

    python bench/student_shape.py                       # the demo's row (after `make demo`)
    python bench/student_shape.py runs/demo/teacher_tuned --work shapes/h6 \\
        --shape '{"layers": 18, "hidden": 576, "ffn": 1280, "heads": 6, "kv_heads": 3}'
    python bench/student_shape.py runs/grammar/teacher_tuned --task grammar --work shapes/g

Defaults are the demo's: its tuned teacher, shape 18/576/1152/9 heads, and distillation of
200 steps of 1 example (lr 3e-4, alpha_ce 0.5, max_length 320); `--distill` overrides any of
those settings. A rerun with the same --work reuses the pruned model. Prints one JSON line.
Skipped when the teacher folder is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEMO_SHAPE = {"layers": 18, "hidden": 576, "ffn": 1152, "heads": 9, "kv_heads": 3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", nargs="?", default="runs/demo/teacher_tuned",
                   help="the teacher to prune and learn from (default: the demo's tuned teacher)")
    p.add_argument("--work", default=None, help="folder for the student (default: a temp folder)")
    p.add_argument("--shape", default=json.dumps(DEMO_SHAPE), help="prune shape as JSON")
    p.add_argument("--distill", default="{}", help="distill settings as JSON, over the demo's")
    p.add_argument("--task", default="summarize", help="preset to distil and score (default: summarize)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer scored (default 48)")
    a = p.parse_args()
    if not Path(a.teacher, "config.json").is_file():
        print(f"skip: no teacher at {a.teacher} (run `make demo` first)", file=sys.stderr)
        return 0

    from slmkit.distill import DistillConfig, distill
    from slmkit.evaluate import EvalConfig, evaluate
    from slmkit.prune import PruneConfig, prune
    from slmkit.tasks import preset_data

    work = Path(a.work or tempfile.mkdtemp(prefix="student-shape-"))
    shape = json.loads(a.shape)
    data = str(preset_data(a.task))
    t0 = time.perf_counter()
    pruned = work / "pruned"
    if not (pruned / "config.json").is_file():
        prune(PruneConfig(a.teacher, str(pruned), calib=data, shape=shape, num_samples=16, seq_len=256,
                          seed=0))
    t1 = time.perf_counter()
    cfg = {"batch_size": 1, "lr": 3e-4, "alpha_ce": 0.5, "max_length": 320, "eval_max": 8,
           "max_steps": 200} | json.loads(a.distill)
    student = distill(DistillConfig(student=str(pruned), teacher=a.teacher, data=data,
                                    task=a.task, out=str(work / "student"), seed=0, **cfg))
    t2 = time.perf_counter()
    m = evaluate(EvalConfig([str(student)], task=a.task, split="eval", max_new_tokens=a.max_new_tokens,
                            batch_size=8))
    key = m["headline"].split(".", 1)[1]
    record = {"shape": shape, "distill": cfg, key: m["models"][0]["task"][key],
              "task": m["models"][0]["task"], "baselines": m.get("baselines"),
              "parameters": m["models"][0]["parameters"], "prune_s": round(t1 - t0, 1),
              "distill_s": round(t2 - t1, 1), "eval_s": round(time.perf_counter() - t2, 1)}
    print(json.dumps(record))
    from slmkit import results

    results.write("student_shape", record, summary=f"shape {json.dumps(shape)}: {key} "
                  f"{100 * record[key]:.1f}, {record['parameters'] / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
