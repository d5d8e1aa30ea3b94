"""Baselines scored beside the models in `slm eval`: what a model must beat to be worth running.

Copy-the-input: the answer is the task's input unchanged. For a correction task (grammar) most
of the target is the input, so copying already scores well; a model below it is worse than doing
nothing. The baseline is shown whenever the targets are close to their inputs (mean ROUGE-L F of
input vs reference >= COPY_MIN_OVERLAP), which holds for grammar correction and not for summaries,
replies or answers.

    base = copy_input(examples, task, score)   # {"name": "copy the input", "task": {...}} or None
"""

from __future__ import annotations

COPY_NAME = "copy the input"
COPY_MIN_OVERLAP = 0.5
"""Mean ROUGE-L F between the input and its first reference from which copying is a baseline."""


def source_text(example, task=None) -> str | None:
    """The text a model would copy: the task's first template field, else the example's input."""
    field = task.fields()[0] if task is not None else "input"
    value = example.row.get(field)
    return value if isinstance(value, str) else None


def input_overlap(examples, task=None) -> float:
    """Mean ROUGE-L F of each example's input against its first reference (0 without inputs)."""
    from slmkit.metrics import rouge

    pairs = [(source_text(e, task), e.references[0]) for e in examples if e.references]
    pairs = [(s, r) for s, r in pairs if s is not None]
    if not pairs:
        return 0.0
    return rouge([s for s, _ in pairs], [[r] for _, r in pairs])["rougeL"]


def copy_input(examples, task, score) -> dict | None:
    """The copy-the-input baseline scored by `score(predictions)` (the task's own metric), or None
    when the targets are not close to the inputs or an example has no input to copy."""
    if not examples:
        return None
    sources = [source_text(e, task) for e in examples]
    if any(s is None for s in sources):
        return None
    overlap = input_overlap(examples, task)
    if overlap < COPY_MIN_OVERLAP:
        return None
    return {"name": COPY_NAME, "input_overlap": overlap, "task": score(sources)}
