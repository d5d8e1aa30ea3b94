"""The hand-written grammar, reply and qa presets load through the task API and stay well formed."""

import json

import pytest

from slmkit import data, tasks
from slmkit.generate import ngrams, words

MINIMUM = {"grammar": 160, "reply": 120, "qa": 100}


def _rows(name):
    return [json.loads(line) for line in tasks.preset_data(name).read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_preset_loads_with_answers_and_both_splits(name):
    task = tasks.get_task(name)
    path = tasks.preset_data(name)
    train = data.load_examples(path, task, split="train", need_answer=True)
    evals = data.load_examples(path, task, split="eval", need_answer=True)
    assert len(train) + len(evals) >= MINIMUM[name]
    # roughly a quarter held out for scoring
    assert 0.15 < len(evals) / (len(train) + len(evals)) < 0.35


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_ids_unique_and_texts_distinct(name):
    rows = _rows(name)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["split"] for r in rows} == {"train", "eval"}
    task = tasks.get_task(name)
    prompts = [task.prompt(r) for r in rows]
    assert len(set(prompts)) == len(prompts)


def test_grammar_mostly_needs_correction_but_not_always():
    rows = _rows("grammar")
    unchanged = sum(r["input"] == r["output"] for r in rows)
    assert 0 < unchanged < 0.15 * len(rows)


def test_qa_has_unanswerable_questions_and_no_passage_in_both_splits():
    rows = _rows("qa")
    unanswerable = [r for r in rows if r["answer"] == "The passage does not say."]
    assert 0.1 < len(unanswerable) / len(rows) < 0.3
    assert any(r["split"] == "eval" for r in unanswerable)
    train = {r["passage"] for r in rows if r["split"] == "train"}
    assert not train & {r["passage"] for r in rows if r["split"] == "eval"}


@pytest.mark.parametrize("name", ["grammar", "qa"])
def test_unlabelled_inputs_have_input_fields_only_and_stay_clear_of_the_eval_split(name):
    """The recipes' `unlabelled:` files: every line carries the task's input fields and no target,
    and none shares a word 6-gram with an eval line's input (the teacher's answers to them are
    training data, so they must not leak the held-out set)."""
    task = tasks.get_task(name)
    path = tasks.preset_data(name).with_name(f"{name}-inputs.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) >= 200 and len({r["id"] for r in rows}) == len(rows)
    for n, row in enumerate(rows, 1):
        task.check(row, f"{path.name}:{n}")
        assert not task.references(row), f"{path.name}:{n} has a target"

    def grams(text):  # generate's own decontamination words, at 6 rather than its 8
        return ngrams(words(text), 6)

    def inputs(row):
        return " ".join(str(row[f]) for f in task.fields())

    held = set().union(*(grams(inputs(r)) for r in _rows(name) if r["split"] == "eval"))
    leaked = {r["id"]: sorted(grams(inputs(r)) & held)[:2] for r in rows if grams(inputs(r)) & held}
    assert not leaked
