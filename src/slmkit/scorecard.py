"""The scorecard of a build: each model's quality on the task beside what one query costs as a
laptop runs it (llama.cpp: file size, peak memory, decode speed, seconds a query), and the line
a user decides on:

    student: 96 % of the teacher's GLEU at 1/8.6 of its file size and 6.1x its decode speed

and, when the eval stage was given benchmarks (`bench`) or a safety set (`safety`), what the
student gave up outside its job, judged as Phi-2 was: each benchmark's score and the ToxiGen-
method safety score for every row, and the student's change from the teacher in points.

Written by `slm build` next to the report (report/scorecard.md, scorecard.json) when the teacher
is a GGUF file the student can be compared with as shipped. Costs are measured in fresh
processes (slmkit.speed), one request at a time, on the cores this machine lends; the quality is
the report's (report/metrics.json).
"""

from __future__ import annotations

import json
from pathlib import Path

# how the scorecard names the report's headline score (metrics["headline"], slmkit.report)
LABELS = {"gleu": "GLEU", "rougeL": "ROUGE-L", "f1": "F1", "exact": "exact match"}


def outside(entry: dict) -> dict[str, float]:
    """One report row's scores outside the task (0-100): each benchmark by name, their `average`
    when there are several (each counts once, as Phi-2's tables average them), then `safety`
    (over the groups every row keeps: report.align_safety)."""
    out = {name: 100 * res["score"] for name, res in (entry.get("benchmarks") or {}).items()}
    if len(out) > 1:  # slm eval's own average, as the report shows it
        out["average"] = 100 * entry["benchmark_average"]
    common = (entry.get("safety") or {}).get("common_score")
    if common is not None:
        out["safety"] = 100 * common
    return out


def quality(entry: dict, key: str) -> float | None:
    """One report row's task score `key` (0-100), or None when it was not scored."""
    value = (entry.get("task") or {}).get(key)
    return None if value is None else 100 * value


def measure(files: dict[str, Path], prompt_tokens: int = 128, new_tokens: int = 64,
            requests: int = 3) -> dict[str, dict]:
    """name -> llama.cpp's cost of one query of `prompt_tokens` in and `new_tokens` out."""
    from slmkit import speed

    return {name: speed.measure_in_subprocess(path, engine="llamacpp", prompt_tokens=prompt_tokens,
                                              new_tokens=new_tokens, requests=requests)
            for name, path in files.items()}


def build(metrics: dict, teacher: str, student: str, costs: dict[str, dict]) -> dict:
    """The scorecard of report rows `teacher` and `student` (names in metrics["models"]); costs:
    row name -> speed.measure's dict for the file that row runs."""
    from slmkit.report import align_safety

    key = metrics["headline"].split(".", 1)[1]  # "task.gleu": the report's own choice
    label = LABELS.get(key, key)
    align_safety(metrics["models"])
    rows = []
    for entry in metrics["models"]:
        cost = costs.get(entry["name"], {})
        rows.append({"name": entry["name"], "quality": quality(entry, key), "outside": outside(entry),
                     "bytes_on_disk": cost.get("bytes_on_disk"),
                     "peak_rss_bytes": cost.get("peak_rss_bytes"),
                     "decode_tokens_per_s": cost.get("decode_tokens_per_s"),
                     "prefill_tokens_per_s": cost.get("prefill_tokens_per_s"),
                     "seconds_per_query": cost.get("latency_p50_s")})
    for base in metrics.get("baselines") or []:
        rows.append({"name": base["name"], "quality": quality(base, key), "outside": {}, "bytes_on_disk": 0,
                     "peak_rss_bytes": None, "decode_tokens_per_s": None,
                     "prefill_tokens_per_s": None, "seconds_per_query": 0.0})
    by = {r["name"]: r for r in rows}
    t, s = by[teacher], by[student]
    card = {"metric": label, "n_examples": metrics.get("n_examples"), "teacher": teacher,
            "student": student, "rows": rows, "query": _query(costs)}
    if t["quality"] and s["quality"] is not None:
        card["share_of_teacher"] = s["quality"] / t["quality"]
    if t["bytes_on_disk"] and s["bytes_on_disk"]:
        card["size_ratio"] = t["bytes_on_disk"] / s["bytes_on_disk"]
    if t["decode_tokens_per_s"] and s["decode_tokens_per_s"]:
        card["speed_ratio"] = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    # what the student gave up outside its job, in points (negative: it lost)
    card["outside_change"] = {k: s["outside"][k] - t["outside"][k]
                              for k in t["outside"] if k in s["outside"]}
    card["headline"] = headline(card)
    return card


def _query(costs: dict) -> dict | None:
    one = next(iter(costs.values()), None)
    if one is None:
        return None
    return {k: one.get(k) for k in ("prompt_tokens", "new_tokens", "requests", "threads",
                                    "load_average")}


def headline(card: dict) -> str:
    parts = []
    if "share_of_teacher" in card:
        parts.append(f"{100 * card['share_of_teacher']:.0f} % of the teacher's {card['metric']}")
    if "size_ratio" in card:
        parts.append(f"at 1/{card['size_ratio']:.1f} of its file size")
    if "speed_ratio" in card:
        parts.append(f"and {card['speed_ratio']:.1f}x its decode speed")
    line = "student: " + " ".join(parts) if parts else "student: not comparable (no scores)"
    change = card.get("outside_change")
    if change:
        # several benchmarks: their average stands for them (the table has each)
        shown = {k: v for k, v in change.items() if "average" not in change or k in ("average", "safety")}
        line += "; outside its job " + ", ".join(f"{k} {v:+.1f}" for k, v in shown.items())
    return line


def markdown(card: dict) -> str:
    gb = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    q = card["query"] or {}
    extra = list(dict.fromkeys(k for r in card["rows"] for k in r.get("outside", {})))
    lines = [f"**{card['headline']}**", "",
             f"{card['metric']} on {card['n_examples']} examples; cost of one query of "
             f"{q.get('prompt_tokens', '?')} prompt tokens and {q.get('new_tokens', '?')} new tokens "
             f"through llama.cpp on {q.get('threads', '?')} thread(s) (load average "
             f"{q.get('load_average', '?')}), one request at a time.", "",
             "| model | " + " | ".join([card["metric"], *extra]) + " | file GiB | peak RSS GiB "
             "| decode tok/s | prompt tok/s | s / query |",
             "|---|" + "---|" * (len(extra) + 6)]
    for r in card["rows"]:
        scores = [num(r["quality"], ".1f")] + [num(r.get("outside", {}).get(k), ".1f") for k in extra]
        lines.append(f"| {r['name']} | {' | '.join(scores)} | {gb(r['bytes_on_disk'])} | "
                     f"{gb(r['peak_rss_bytes'])} | {num(r['decode_tokens_per_s'], '.1f')} | "
                     f"{num(r['prefill_tokens_per_s'], '.0f')} | {num(r['seconds_per_query'], '.2f')} |")
    if extra:
        lines += ["", f"Outside the task ({', '.join(extra)}): 0-100, higher is better"
                  + ("; the safety score follows the ToxiGen method over the groups every row keeps."
                     if "safety" in extra else ".")]
    return "\n".join(lines) + "\n"


def write(out: Path, card: dict) -> Path:
    from slmkit import models

    out = Path(out)
    with models.atomic_write(out / "scorecard.json") as f:
        json.dump(card, f, indent=2)
    with models.atomic_write(out / "scorecard.md") as f:
        f.write(markdown(card))
    return out / "scorecard.md"
