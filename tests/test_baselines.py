"""Copy-the-input baseline: scored with the task's metric when targets are close to their inputs,
shown in the scorecard beside the models, and a model below it flagged."""

import pytest

from slmkit import baselines, report
from slmkit.data import Example
from slmkit.evaluate import score_task
from slmkit.tasks import get_task


def _examples(pairs, field="input"):
    return [Example(references=[out], row={field: src, "output": out}) for src, out in pairs]


GRAMMAR = [("She go to school .", "She goes to school ."),
           ("I has a cat and a dog .", "I have a cat and a dog ."),
           ("They was happy yesterday .", "They were happy yesterday .")]


def test_copy_input_scores_the_inputs_with_the_task_metric():
    task = get_task("grammar")
    ex = _examples(GRAMMAR)
    base = baselines.copy_input(ex, task, lambda preds: score_task("gleu", ex, preds, task))
    assert base["name"] == "copy the input"
    assert base["task"] == score_task("gleu", ex, [s for s, _ in GRAMMAR], task)
    # the references beat copying: the baseline is a floor below a perfect corrector
    perfect = score_task("gleu", ex, [o for _, o in GRAMMAR], task)["gleu"]
    assert 0 < base["task"]["gleu"] < perfect


def test_no_copy_baseline_when_targets_are_not_close_to_inputs():
    task = get_task("reply")
    ex = _examples([("Are you free for coffee on Saturday?", "I'd love to, 3pm works."),
                    ("Can you send the slides?", "Sure, attaching them now.")], field="message")
    assert baselines.input_overlap(ex, task) < baselines.COPY_MIN_OVERLAP
    assert baselines.copy_input(ex, task, lambda preds: pytest.fail("must not score")) is None


def test_scorecard_shows_the_baseline_and_flags_a_model_below_it():
    def model(name, gleu):
        return {"name": name, "parameters": 100, "task": {"gleu": gleu, "n": 3}}

    m = report.add_relative({"models": [model("teacher", 0.80), model("student", 0.40)],
                             "baselines": [{"name": "copy the input", "task": {"gleu": 0.50}}]})
    lines = report.scorecard(m).splitlines()
    assert lines[0] == "|  | teacher (reference) | student | copy the input (baseline) |"
    assert "| GLEU | 80.0 | 40.0 (50%) **below copy the input** | 50.0 (62%) |" in lines
    assert "| parameters | 100 | 100 (1.00x) | - |" in lines
