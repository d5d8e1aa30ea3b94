"""Benchmark `slm eval` on the embedded default model and a smaller student, on real data.

    python bench/eval_report.py [--student FOLDER] [--limit 20] [--out runs/bench-eval]

Without --student, a quick student is made by keeping the first half of default's layers (no
training: it shows what the report looks like when quality drops, not a good student).
Runs: summaries on DialogSum (ROUGE, ../shared/data/dialogsum-dev.jsonl), grammar correction on
JFLEG (GLEU against 4 references, ../shared/data/jfleg-dev.jsonl), speed with torch and, when
llama-cpp-python is installed, the default GGUF with llama.cpp side by side; then a screenshot of
report.html with headless Chromium when one is installed. Prints every scorecard.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def half_student(out: Path) -> Path:
    """default with its first half of layers kept (a crude student for the demo)."""
    from slmkit import models

    if (out / "config.json").is_file():
        return out
    model, tok = models.load_model("default", device="cpu")
    keep = model.config.num_hidden_layers // 2
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    models.save_model(model, tok, out)
    return out


def run(name: str, argv: list[str]) -> dict:
    """`slm eval ARGV` in this process (it prints the scorecard), timed; its metrics.json."""
    import json

    from slmkit.cli import main

    print(f"\n== {name}: slm eval {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    if main(["eval", *argv]):
        raise SystemExit(f"slm eval failed for {name}")
    seconds = time.perf_counter() - t
    print(f"({seconds:.0f} s)")
    out = Path(argv[argv.index("--out") + 1])
    return {"command": "slm eval " + " ".join(argv), "seconds": round(seconds, 1),
            "metrics": json.loads((out / "metrics.json").read_text())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="a student folder (default: default with half its layers)")
    p.add_argument("--limit", type=int, default=20, help="examples per data set")
    p.add_argument("--out", default="runs/bench-eval")
    a = p.parse_args()
    out = Path(a.out)
    if not DATA.is_dir():
        print(f"skipped: no development data in {DATA}", file=sys.stderr)
        return 0
    student = a.student or str(half_student(out / "default-half"))
    runs = {}
    runs["summaries"] = run("summaries", ["default", student, "--names", "default,student", "--task", "summarize",
                      "--data", str(DATA / "dialogsum-dev.jsonl"), "--limit", str(a.limit), "--speed",
                      "--out", str(out / "summarize")])
    runs["grammar"] = run("grammar", ["default", student, "--names", "default,student", "--task", "grammar",
                    "--data", str(DATA / "jfleg-dev.jsonl"), "--limit", str(a.limit),
                    "--out", str(out / "grammar")])
    try:
        import llama_cpp  # noqa: F401

        from slmkit import models

        # the same weights twice: the converted folder runs on torch, the GGUF on llama.cpp
        runs["engines"] = run("engines", [str(models.resolve("default")), "default", "--names", "torch-f32,llamacpp-gguf",
                        "--speed", "--engine", "llamacpp", "--out", str(out / "engines")])
    except ImportError:
        print("\n(llama-cpp-python not installed: engine comparison skipped)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:
        shot = out / "summarize" / "screenshot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2200",
                        f"--screenshot={shot}", (out / "summarize" / "report.html").resolve().as_uri()],
                       capture_output=True, timeout=120)
        print(f"\nscreenshot: {shot}")
    from slmkit import results

    results.write("eval_report", runs, summary="; ".join(
        f"{k}: {results.scorecard_summary(v['metrics'])}" for k, v in runs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
