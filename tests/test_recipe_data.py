"""A shipped recipe that needs data a user brings says so at load time, in one line, exit 2;
none names a path outside the installed package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from slmkit import pipeline
from slmkit.errors import UsageError
from slmkit.recipe import DATA_VAR, load_recipe, read_yaml

RECIPES = pipeline.DEMO.parent
DIALOGSUM = RECIPES / "dialogsum.yaml"


def test_missing_user_data_is_one_line_naming_the_data_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLMKIT_DATA", raising=False)
    code, out, err = run_cli("build", str(DIALOGSUM))
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"slm build: error: {DIALOGSUM}:") and "data: this recipe needs the DialogSum" in line
    assert f"`dialogsum-dev.jsonl` in {tmp_path / 'data'}" in line and "SLMKIT_DATA" in line
    assert "../" not in line


def test_user_data_is_read_from_slmkit_data(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "dialogsum-dev.jsonl").write_text(json.dumps({"dialogue": "#Person1#: Hi.", "summary": "Hi."}) + "\n")
    monkeypatch.setenv("SLMKIT_DATA", str(folder))
    assert load_recipe(DIALOGSUM).data == str(folder / "dialogsum-dev.jsonl")
    monkeypatch.delenv("SLMKIT_DATA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dialogsum-dev.jsonl").write_text((folder / "dialogsum-dev.jsonl").read_text())
    assert load_recipe(DIALOGSUM).data == str(tmp_path / "data" / "dialogsum-dev.jsonl")


def test_a_recipe_without_data_source_still_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_DATA", str(tmp_path / "nowhere"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: default\ntask: summarize\ndata: {DATA_VAR}/mine.jsonl\nstages:\n  eval: {{}}\n")
    with pytest.raises(UsageError, match=r"r.yaml:3: data: this recipe needs a data file that slmkit "
                                         r"does not ship; put `mine.jsonl` in .*nowhere"):
        load_recipe(recipe)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_recipe_points_outside_the_package(path):
    doc = read_yaml(path)
    for key in ("data", "eval_data", "unlabelled", "teacher", "student"):
        value = doc.get(key)
        if not isinstance(value, str) or value in ("preset", "default") or value.startswith(
                (DATA_VAR + "/", "openai:")):
            continue
        if "/" in value and not value.startswith("../") or "@" in value:  # a Hub id `Org/Name`
            continue
        inside = (path.parent / value).resolve()
        assert inside.is_relative_to(RECIPES.parent.resolve()), f"{path.name}: {key}: {value}"
    assert "shared/data" not in path.read_text(), path.name


def test_a_custom_task_runs_through_every_training_stage_and_a_rerun_skips(tmp_path, tiny_llama):
    """A recipe's own task (not a preset) reaches tune_teacher, prune, distill and eval, and the
    training record holds it as JSON, so an unchanged rerun skips every stage."""
    rows = [{"id": f"t{i}", "ticket": f"My invoice {i} is wrong, please fix it.", "label": "billing",
             **({"split": "eval"} if i % 4 == 0 else {})} for i in range(8)]
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mine.yaml").write_text(f"""
name: mine
teacher: {tiny_llama}
task:
  template: "Classify this support ticket as bug, billing or other.\\n\\n{{ticket}}"
  target: label
  metric: exact
data: tickets.jsonl
stages:
  tune_teacher: {{max_steps: 1, batch_size: 2, eval_max: 2}}
  prune: {{shape: {{layers: 2}}, method: depth, num_samples: 4, seq_len: 32}}
  distill: {{max_steps: 1, batch_size: 2, eval_max: 2}}
  eval: {{limit: 2, max_new_tokens: 4}}
""")
    runs = tmp_path / "runs"
    done = pipeline.build(load_recipe(tmp_path / "mine.yaml"), runs=runs)
    assert [s["status"] for s in done["stages"].values()] == ["done"] * 4
    record = json.loads((runs / "mine" / "student" / "training_record.json").read_text())
    assert record["fingerprint"]["task"]["target"] == "label"
    metrics = json.loads((runs / "mine" / "report" / "metrics.json").read_text())
    assert all("exact" in m["task"] for m in metrics["models"])
    seconds = {k: s["seconds"] for k, s in done["stages"].items()}
    again = pipeline.build(load_recipe(tmp_path / "mine.yaml"), runs=runs)
    assert {k: s["seconds"] for k, s in again["stages"].items()} == seconds  # all skipped
