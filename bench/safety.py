"""Safety of the teacher and of the students the big-teacher recipes made, as Phi-2 judged it:
the share of (harmful, neutral) sentence pairs about one demographic group in which a model finds
the harmful one less likely (Mann-Whitney U; groups without a significant difference dropped;
slmkit.safety), on the statements of ToxiGen's prompt files.

    git clone https://github.com/microsoft/TOXIGEN    # not shipped: MIT code, CDLA-Permissive-2.0 data
    TOXIGEN=TOXIGEN python bench/safety.py

ToxiGen's prompts/{hate,neutral}_GROUP_1k.txt hold a few hundred distinct statements a label
and group (15 groups have both). They carry no per-sentence toxicity annotation, so every
sentence counts with toxicity 1: the score compares plain perplexities, where Phi-2's ToxiGen
score first divides each by its annotated toxicity (1-5). Models: the packaged 1.5B teacher, the
default SmolLM2-135M, and runs/grammar-big-teacher/student and runs/dialogsum-big-teacher/student
where built. Writes results/safety/<date>-<commit>-<machine>.json; skips without TOXIGEN or the
1.5B.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import packaged, results  # noqa: E402

TEACHER = "qwen2.5-coder-1.5b-instruct"
STUDENTS = {"grammar student": "runs/grammar-big-teacher/student",
            "summary student": "runs/dialogsum-big-teacher/student"}


def toxigen_items(folder: Path) -> list[dict]:
    """slmkit safety items from ToxiGen's prompt files: each file's lines are statements joined
    by a literal `\\n- `; one item per distinct statement and label of a group, groups that have
    both labels only."""
    seen: dict[tuple[str, str], dict[str, None]] = {}
    for path in sorted((folder / "prompts").glob("*_1k.txt")):
        m = re.fullmatch(r"(hate|neutral)_(.+)_1k\.txt", path.name)
        if not m:
            continue
        label, group = m.groups()
        texts = seen.setdefault((label, group), {})
        for line in path.read_text(encoding="utf-8").splitlines():
            for part in line.split("\\n"):
                text = part.strip().lstrip("-").strip()
                if text:
                    texts[text] = None
    groups = {g for (label, g) in seen if label == "hate"} & {g for (label, g) in seen if label == "neutral"}
    return [{"text": t, "toxicity_score": 1, "label": label, "target_groups": [group]}
            for (label, group), texts in sorted(seen.items()) if group in groups for t in texts]


def main() -> int:
    folder = os.environ.get("TOXIGEN")
    if not folder or not (Path(folder) / "prompts").is_dir():
        print("bench/safety.py: skipped: set TOXIGEN to a checkout of github.com/microsoft/TOXIGEN")
        return 0
    if not packaged.installed(TEACHER):
        print(f"bench/safety.py: skipped: {TEACHER} is not installed (`make models`)")
        return 0
    items = toxigen_items(Path(folder))
    names, models = ["teacher: Qwen2.5-Coder-1.5B", "SmolLM2-135M (default)"], [TEACHER, "default"]
    for name, path in STUDENTS.items():
        if (ROOT / path / "model.safetensors").is_file():
            names.append(name)
            models.append(path)
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "toxigen-prompts.jsonl"
        data.write_text("".join(json.dumps(it) + "\n" for it in items))
        run = results.run_slm(["eval", *models, "--names", ",".join(names), "--safety", data,
                               "--out", Path(work) / "report"], ROOT, Path(work))
        if run["exit"] != 0:
            print(f"bench/safety.py: slm eval failed: {run.get('error')}")
            return 1
        metrics = json.loads((Path(work) / "report" / "metrics.json").read_text())
    rows = {m["name"]: {"score": None if m["safety"]["score"] is None else round(100 * m["safety"]["score"], 1),
                        "common_score": (None if m["safety"].get("common_score") is None
                                         else round(100 * m["safety"]["common_score"], 1)),
                        "groups_kept": len(m["safety"]["groups"]), "dropped": m["safety"]["dropped"]}
            for m in metrics["models"]}
    counts = {label: sum(it["label"] == label for it in items) for label in ("hate", "neutral")}
    record = {"eval": run, "sentences": counts, "groups": len({it["target_groups"][0] for it in items}),
              "common_groups": metrics["models"][0]["safety"].get("common_groups"), "models": rows}
    summary = ("safety on ToxiGen prompts (toxicity 1): " + ", ".join(
        f"{n} {r['common_score']}" for n, r in rows.items()) + f" over {len(record['common_groups'] or [])} "
               "groups every model keeps")
    print(summary)
    results.write("safety", record, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
