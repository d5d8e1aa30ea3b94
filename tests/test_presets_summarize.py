"""The `summarize` preset data: well-formed, big enough, split, and not filled from a template."""

import json
from collections import Counter

from slmkit import data, tasks


def _rows():
    path = tasks.preset_data("summarize")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_well_formed_and_split():
    rows = _rows()
    assert len(rows) >= 160
    assert len({r["id"] for r in rows}) == len(rows)
    splits = Counter(r["split"] for r in rows)
    assert set(splits) == {"train", "eval"} and splits["eval"] >= 30
    for r in rows:
        turns = r["dialogue"].split("\n")
        assert 4 <= len(turns) <= 10, r["id"]
        assert all(": " in t and t.split(": ", 1)[1].strip() for t in turns), r["id"]
        words = len(r["summary"].split())
        assert 10 <= words <= 45, r["id"]


def test_loads_through_the_task():
    task = tasks.get_task("summarize")
    ev = data.load_examples(tasks.preset_data("summarize"), task, split="eval", need_answer=True)
    tr = data.load_examples(tasks.preset_data("summarize"), task, split="train", need_answer=True)
    assert len(ev) >= 30 and len(tr) >= 120


def test_not_templated():
    # No summary opening (first three words) may repeat often, and dialogues are distinct.
    rows = _rows()
    openings = Counter(" ".join(r["summary"].split()[:3]) for r in rows)
    assert openings.most_common(1)[0][1] <= 3
    assert len({r["dialogue"] for r in rows}) == len(rows)
