"""recipes/api-teacher.yaml end to end against a live `slm serve` on loopback: the served teacher
writes the data with its completion top-k, the student (another tokenizer) is distilled offline
from that file, and the server is never asked for prompt log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_chat_sp_tokenizer, make_tiny_model_with
from test_generate import DIALOGUES  # the generate tests' inputs, written by the teacher here too

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_api_teacher_recipe_builds_against_a_live_server(tmp_path, tiny_llama):
    from slmkit import pipeline
    from slmkit.backends.hf import HFBackend
    from slmkit.recipe import load_recipe
    from slmkit.serve import start_server

    asked = []

    class CompletionsOnly(HFBackend):  # as Ollama or a hosted API: no prompt scoring
        def score_prompt(self, ids, k):
            asked.append(len(ids))
            raise NotImplementedError("this server cannot score prompts")

    student = make_tiny_model_with(make_chat_sp_tokenizer(), "qwen2", tmp_path / "student", layers=2)
    data = tmp_path / "inputs.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "dialogue": DIALOGUES[i % 6] + f" ({i})"}) + "\n"
                            for i in range(24)))
    shipped = yaml.safe_load((ROOT / "recipes" / "api-teacher.yaml").read_text())
    gen, dist = shipped["stages"]["generate"], shipped["stages"]["distill"]
    assert gen["topk_logprobs"] > 0 and "teacher_cache" not in dist
    with start_server([CompletionsOnly(str(tiny_llama), name="big")]) as server:
        # the shipped recipe, pointed at this server, the tiny student and small data; its eval
        # and export stages (llama.cpp, minutes) are left out
        recipe = shipped | {"teacher": f"openai:big@{server.url}/v1", "student": str(student),
                            "data": str(data), "stages": {
                                "generate": gen | {"n": 2, "max_new_tokens": 8, "threshold": 0.0,
                                                   "judge": False},
                                "distill": dist | {"max_steps": 6, "batch_size": 4, "lr": 3e-3,
                                                   "eval_every": 3}}, "device": "cpu"}
        path = tmp_path / "api-teacher.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = pipeline.build(load_recipe(path), runs=tmp_path / "runs")
    stages = result["stages"]
    assert [s for s in stages if stages[s]["status"] == "done"] == ["generate", "distill"]
    cache = stages["generate"]["outputs"]["teacher_cache"]
    stats = stages["generate"]["outputs"]["stats"]
    assert Path(cache).is_file() and stats["topk_lines"] >= 6
    # every line's tokens spell its answer, though a random model's pieces of characters come
    # as U+FFFD over HTTP
    assert stats["topk_aligned"] == stats["topk_lines"]
    out = Path(stages["distill"]["outputs"]["student"])
    record = json.loads((out / "training_record.json").read_text())
    assert record["config"]["teacher"] is None and record["config"]["teacher_cache"] == cache
    evals = [json.loads(line)["eval_kd"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_kd" in line]
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    assert not asked  # no prompt log-probs were needed
