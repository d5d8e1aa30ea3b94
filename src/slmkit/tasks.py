"""Task presets: a prompt template with `{field}` slots, the field holding the reference answer,
and the metric that scores it. Presets ship example data written for this project
(`slmkit/presets/NAME.jsonl`, each line with `"split": "train"|"eval"`).

    task = get_task("summarize")
    task.prompt({"dialogue": "#Person1#: Hi ..."})   # -> the user message sent to the model
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from slmkit.errors import UsageError

PRESET_DIR = Path(__file__).parent / "presets"
METRICS = ("rouge", "gleu", "f1", "exact")


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    """User message with `{field}` slots filled from each example."""
    target: str
    """Field with the reference answer (used for training and scoring)."""
    metric: str
    """Quality metric: rouge (ROUGE-L headline), gleu (several references), f1, exact."""
    references_field: str | None = None
    """Optional field with a list of extra references (e.g. JFLEG's four corrections)."""
    description: str = ""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise UsageError(f"task `{self.name}`: unknown metric `{self.metric}`; "
                             f"choose one of {', '.join(METRICS)}")
        if not self.fields():
            raise UsageError(f"task `{self.name}`: the template has no {{field}} slot")

    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def check(self, row: dict, where: str, need_target: bool = False) -> None:
        """Raise a UsageError naming `where` (file:line) when a field the task needs is missing."""
        missing = [f for f in self.fields() if not isinstance(row.get(f), str)]
        if need_target and not self.references(row):
            missing.append(self.target)
        if missing:
            raise UsageError(f"{where}: missing text field(s) {', '.join(f'`{m}`' for m in missing)} "
                             f"that task `{self.name}` needs (template: {self.template[:60]!r}...)")

    def prompt(self, row: dict) -> str:
        return self.template.format(**{f: row[f] for f in self.fields()})

    def references(self, row: dict) -> list[str]:
        refs = []
        value = row.get(self.target)
        if isinstance(value, str) and value.strip():
            refs.append(value)
        elif isinstance(value, list):
            refs += [v for v in value if isinstance(v, str)]
        if self.references_field and isinstance(row.get(self.references_field), list):
            refs += [v for v in row[self.references_field] if isinstance(v, str) and v not in refs]
        return refs

    def answer(self, row: dict) -> str | None:
        refs = self.references(row)
        return refs[0] if refs else None


PRESETS: dict[str, Task] = {
    "summarize": Task(
        name="summarize",
        template="Summarize the following conversation in one or two sentences.\n\n{dialogue}",
        target="summary", metric="rouge",
        description="conversation -> one or two sentence summary"),
    "grammar": Task(
        name="grammar",
        template=("Correct the grammar, spelling and punctuation of the following text. "
                  "Reply with the corrected text only.\n\n{input}"),
        target="output", references_field="references", metric="gleu",
        description="proofreading and grammar correction"),
    "reply": Task(
        name="reply",
        template="Write a short, natural reply to this message.\n\n{message}",
        target="reply", metric="rouge",
        description="a short contextual reply to a message"),
    "qa": Task(
        name="qa",
        template=("Answer the question using only the passage below. If the passage does not "
                  "contain the answer, say that the passage does not say.\n\n"
                  "Passage: {passage}\n\nQuestion: {question}"),
        target="answer", metric="f1",
        description="answer a question only from a given passage"),
}


def get_task(name: str | Task) -> Task:
    """The preset `name`; a Task (a recipe's custom task, handed on by `slm build`) is itself."""
    if isinstance(name, Task):
        return name
    if name not in PRESETS:
        raise UsageError(f"unknown task `{name}`; presets: {', '.join(PRESETS)} "
                         "(or define a custom task with a template and a metric in a recipe)")
    return PRESETS[name]


def preset_data(name: str) -> Path:
    """The JSONL examples shipped with a preset (lines carry `"split": "train"|"eval"`)."""
    get_task(name)
    path = PRESET_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise UsageError(f"preset `{name}` ships no example data ({path.name} missing)")
    return path
