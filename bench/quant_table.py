"""What each quantisation of a student gives a laptop user: file size, llama.cpp decode speed and
task quality through llama.cpp, beside the PyTorch (HF) student it was exported from.

    python bench/quant_table.py                                 # the demo's student (make demo)
    python bench/quant_table.py runs/grammar/student --task grammar --quants q8_0 q4_k_m

One run: `slm export` of the student in each quantisation (into --work), then one `slm eval` of
the HF student and every file on the preset's eval split (greedy, the same prompts), with
`--speed` (each model timed in a child process: single-stream decode tokens/s, time to first
token, peak RSS). Prints a markdown table; the full report is in WORK/report. Skipped when the
student folder is absent. llama.cpp's speed collapses when its threads share cores with other
jobs (it spin-waits), so the script prints the load average before and after: trust the speeds
only from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from slmkit.export import QUANTS as ALL_QUANTS
from slmkit import results
from slmkit.speed import usable_cores

QUANTS = [q for q in ALL_QUANTS if q != "f32"]  # f32: as big as the HF student, nothing to learn


def slm(*args: str) -> None:
    cmd = [sys.executable, "-m", "slmkit", *args]
    print("$ slm " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", nargs="?", default="runs/demo/student", help="HF student folder")
    p.add_argument("--task", default="summarize", help="preset whose eval split is scored")
    p.add_argument("--quants", nargs="+", default=QUANTS, help=f"default: {' '.join(QUANTS)}")
    p.add_argument("--work", default=None, help="folder for the files and the report "
                   "(default: STUDENT/../quants)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args()
    student = Path(a.student)
    if not (student / "config.json").is_file():
        print(f"skip: no student at {student} (run `make demo` first)", file=sys.stderr)
        return 0
    work = Path(a.work) if a.work else student.parent / "quants"
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {usable_cores()} cores", file=sys.stderr)
    t0 = time.perf_counter()
    files = []
    for q in a.quants:
        f = work / f"student.{q}.gguf"
        if not f.is_file():
            slm("export", str(student), "--quant", q, "--out", str(f))
        files.append(f)
    export_s = time.perf_counter() - t0
    slm("eval", str(student), *map(str, files), "--names", ",".join(["HF (float32)", *a.quants]),
        "--task", a.task, "--engine", "llamacpp", "--speed", "--max-new-tokens", str(a.max_new_tokens),
        "--out", str(work / "report"))
    load_after = os.getloadavg()[0]
    m = json.loads((work / "report" / "metrics.json").read_text())
    key = m["headline"].split(".", 1)[1]
    rows = ["| quant | MiB | decode tokens/s | time to first token | peak RSS MiB | "
            f"{key} | of HF |", "|---|---|---|---|---|---|---|"]
    ref = m["models"][0]["task"][key]
    for model in m["models"]:
        s = model.get("speed") or {}
        score = model["task"][key]
        rows.append(f"| {model['name']} | {model['bytes_on_disk'] / 2**20:.0f} | "
                    f"{s.get('decode_tokens_per_s', float('nan')):.1f} | "
                    f"{s.get('ttft_s', float('nan')) * 1000:.0f} ms | "
                    f"{s.get('peak_rss_bytes', 0) / 2**20:.0f} | {100 * score:.1f} | "
                    f"{100 * score / ref:.0f}% |")
    print("\n".join(rows))
    print(f"\n{m['n_examples']} examples of `{a.task}` ({m['split']} split), greedy, "
          f"{a.max_new_tokens} new tokens; exports {export_s:.0f} s; load average after "
          f"{load_after:.1f} on {usable_cores()} cores")
    results.write("quant_table", {"task": a.task, "student": str(student), "export_s": export_s,
                                  "load_after": load_after, "table": rows, "metrics": m},
                  summary=f"{key}: " + results.scorecard_summary(m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
