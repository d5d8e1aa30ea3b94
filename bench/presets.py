"""Every preset recipe end to end: `slm build recipes/NAME.yaml`, then one table of each recipe's
scorecard (tuned teacher, zero-shot teacher, student, baselines), student size and time.

    python bench/presets.py                              # grammar, reply, qa
    python bench/presets.py grammar --jfleg-limit 200    # one recipe; JFLEG dev cut to 200 lines

A finished stage is skipped on a rerun (slm build's manifest), so the time shown is the sum of
the stages' own seconds from runs/NAME/manifest.json, whichever run did them. For `grammar` the
tuned teacher and the student also correct JFLEG dev (../shared/data/jfleg-dev.jsonl, GLEU
against its four references; never trained on: it measures transfer) beside copy-the-input.
Prints Markdown; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JFLEG = ROOT.parent / "shared" / "data" / "jfleg-dev.jsonl"
PRESETS = ("grammar", "reply", "qa")
NAMES = {"tuned": "teacher (tuned)", "zero": "teacher (zero-shot)", "student": "student"}


def build(name: str, runs: Path) -> float:
    """Run the recipe (finished stages are skipped); the stages' summed seconds."""
    cmd = [sys.executable, "-m", "slmkit", "build", str(ROOT / "recipes" / f"{name}.yaml"), "--runs", str(runs)]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT)
    stages = json.loads((runs / name / "manifest.json").read_text())["stages"]
    return sum(s.get("seconds", 0) for s in stages.values() if s.get("status") == "done")


def pct(value, ref) -> str:
    return f"{100 * value:.1f} ({100 * value / ref:.0f} %)" if ref else f"{100 * value:.1f}"


def row(name: str, metrics: dict, seconds: float) -> dict:
    """One recipe's figures from its report/metrics.json."""
    key = metrics["headline"].split(".", 1)[1]
    by = {m["name"]: m for m in metrics["models"]}
    tuned, zero, student = (by[NAMES[k]] for k in ("tuned", "zero", "student"))
    ref = tuned["task"][key]
    base = next(iter(metrics.get("baselines") or []), None) or copy_baseline(name)
    if metrics.get("metric") == "f1" and "unanswerable_acc" not in tuned["task"]:
        answerability(metrics)
    extra = []
    for k, label in (("f1_answerable", "F1 answerable"), ("unanswerable_acc", "unanswerable acc")):
        if k in tuned["task"]:
            extra.append(f"{label} {100 * tuned['task'][k]:.1f} -> {100 * student['task'][k]:.1f}")
    return {"preset": name, "metric": key, "n": tuned["task"].get("n"),
            "tuned": 100 * ref, "zero": pct(zero["task"][key], ref),
            "student": pct(student["task"][key], ref) + paired(student, key),
            "kept": student["task"][key] / ref if ref else None,
            "copy": pct(base["task"][key], ref) if base else "-",
            "params": f"{student['parameters'] / 1e6:.1f}M ({100 * student['parameters'] / tuned['parameters']:.1f} %)",
            "seconds": seconds, "extra": "; ".join(extra)}


def paired(entry: dict, key: str) -> str:
    """", -3.1 +- 1.7 paired": the model minus the report's reference (the tuned teacher) on
    `key`, when the report has it (slm eval writes it since the paired rows came in)."""
    p = entry["task"].get("paired")
    return f", {100 * p['diff']:+.1f} +- {100 * p['se']:.1f} paired" if p and p["key"] == key else ""


def answerability(metrics: dict) -> None:
    """Add qa's answerable F1 / unanswerable accuracy from the report's predictions (a report
    written before slm eval split them has only the overall F1)."""
    from slmkit.evaluate import _slug
    from slmkit.metrics import answerability as split

    for m in metrics["models"]:
        path = Path(metrics["_report"]) / "predictions" / f"{_slug(m['name'])}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        m["task"] |= split([r["prediction"] for r in rows], [r["references"] for r in rows])


def copy_baseline(name: str, data: str | None = None, split: str | None = "eval",
                  limit: int | None = None) -> dict | None:
    """Copy-the-input on the preset's eval split or on `data` (a report written before slm eval
    showed baselines has none; it needs no model)."""
    from slmkit.baselines import copy_input
    from slmkit.data import load_examples
    from slmkit.evaluate import score_task
    from slmkit.tasks import get_task, preset_data

    task = get_task(name)
    ex = load_examples(data or str(preset_data(name)), task, split=split, need_answer=True, limit=limit)
    return copy_input(ex, task, lambda preds: score_task(task.metric, ex, preds, task))


def jfleg(runs: Path, limit: int | None) -> dict:
    """GLEU of the tuned teacher and the student on JFLEG dev, with copy-the-input."""
    from slmkit.evaluate import EvalConfig, evaluate

    run = runs / "grammar"
    t0 = time.perf_counter()
    m = evaluate(EvalConfig([str(run / "teacher_tuned"), str(run / "student")],
                            names=["teacher (tuned)", "student"], task="grammar", data=str(JFLEG),
                            split=None, limit=limit, max_new_tokens=60))
    gleu = {e["name"]: e["task"]["gleu"] for e in m["models"]}
    base = next(iter(m.get("baselines") or []), None) or copy_baseline("grammar", str(JFLEG), None, limit)
    return {"n": m["n_examples"], "gleu": gleu, "copy": base["task"]["gleu"] if base else None,
            "paired": paired(m["models"][1], "gleu"), "seconds": time.perf_counter() - t0}


def table(rows: list[dict], jf: dict | None) -> str:
    out = ["| preset (metric, eval examples) | tuned teacher | zero-shot teacher | student (% of tuned) "
           "| copy the input | student parameters (% of teacher) | recipe time | other |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['preset']} ({r['metric']}, {r['n']}) | {r['tuned']:.1f} | {r['zero']} | {r['student']} "
                   f"| {r['copy']} | {r['params']} | {r['seconds'] / 60:.1f} min | {r['extra'] or '-'} |")
    if jf:
        t, s = jf["gleu"]["teacher (tuned)"], jf["gleu"]["student"]
        out += ["", f"grammar on JFLEG dev ({jf['n']} sentences, GLEU, {jf['seconds'] / 60:.1f} min): "
                f"tuned teacher {100 * t:.1f}, student {pct(s, t)}{jf['paired']}, copy the input "
                f"{100 * jf['copy']:.1f} (student - copy = {100 * (s - jf['copy']):+.1f})"]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="*", default=list(PRESETS), help="recipes to run (default: all)")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="run folder root (default: runs/)")
    p.add_argument("--jfleg-limit", type=int, default=None, help="score the first N JFLEG lines only")
    p.add_argument("--no-jfleg", action="store_true", help="skip the JFLEG transfer check")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    a = p.parse_args()
    unknown = [n for n in a.presets if n not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    runs = Path(a.runs)
    rows = []
    for name in a.presets:
        seconds = build(name, runs)
        metrics = json.loads((runs / name / "report" / "metrics.json").read_text())
        metrics["_report"] = str(runs / name / "report")
        rows.append(row(name, metrics, seconds))
    jf = None
    if "grammar" in a.presets and not a.no_jfleg:
        if JFLEG.is_file():
            jf = jfleg(runs, a.jfleg_limit)
        else:
            print(f"skip JFLEG: {JFLEG} not found", file=sys.stderr)
    text = table(rows, jf)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    from slmkit import results

    results.write("presets", {"rows": rows, "jfleg": jf, "table": text}, summary="; ".join(
        f"{r['preset']}: student {r['student']} vs tuned teacher {r['tuned']:.1f} ({r['metric']}), "
        f"{r['seconds'] / 60:.1f} min" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
