"""Recipes: YAML files that describe a whole build, validated on load.

Every error names the recipe file, the line and the key, e.g.
`recipes/demo.yaml:14: distill.lr: expected a number, got 'fast'`.

    name: demo                 # run folder: runs/demo/
    teacher: default           # MODEL: HF folder, .gguf, `default`, or openai:NAME@URL (generate only)
    task: summarize            # a preset name, or {template, target, metric[, references_field]}
    data: preset               # `preset` (the task's shipped examples) or a JSONL path
    # data: $SLMKIT_DATA/x.jsonl   # data a user brings: the folder $SLMKIT_DATA names (./data)
    # eval_part: test            # score a dev set's test part; `validation` while choosing settings
    # data_source: "..."         # what that file is and where to get it, said when it is missing
    stages:                    # run in this order; leave a stage out to skip it
      tune_teacher: {max_steps: 40}
      label: {}                # the tuned teacher answers data lines that have no target
      prune: {target: 0.5}
      distill: {max_steps: 120}
      eval: {limit: 40}
      export: {quant: q8_0}

Stage options are the fields of the stage's config dataclass (PruneConfig, DistillConfig,
EvalConfig, ExportConfig, GenerateConfig for generate and label), whose flags the commands are,
so the recipe and the commands share one vocabulary and one set of types; the fields marked
`wired` (model paths, data, task, output folder, device) are set by the pipeline and not allowed
in a recipe.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.cli import check_value
from slmkit.errors import UsageError, read_text

# export runs before eval so the scorecard can show the exported files as a laptop runs them;
# label comes after tune_teacher so the tuned teacher writes the missing answers
STAGES = ("generate", "tune_teacher", "label", "prune", "distill", "export", "eval")
# a run name is one path component: it names runs/NAME/ and the exported files
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TOP_KEYS = {"name", "teacher", "student", "task", "data", "eval_data", "eval_part", "unlabelled", "seed",
            "device", "stages", "description", "data_source"}
# `eval_part:` scores one part of a dev set (data.dev_part): choose settings on `validation`,
# report `test`; the other part is kept out of training too
EVAL_PARTS = ("validation", "test")
# a data path that starts with this is read from the user's data folder, not the recipe's: a
# shipped recipe can name data that slmkit does not ship without pointing outside the package
DATA_VAR = "$SLMKIT_DATA"


def data_dir() -> Path:
    """The folder `$SLMKIT_DATA/...` paths are read from: $SLMKIT_DATA, else ./data."""
    import os

    return Path(os.environ.get("SLMKIT_DATA") or "data").expanduser().resolve()


class Node(dict):
    """A mapping read from YAML that remembers the line of each key (1-based)."""

    lines: dict

    def line(self, key) -> int | None:
        return self.lines.get(key)


@dataclass
class Recipe:
    path: Path
    name: str
    teacher: str
    task: object  # tasks.Task
    data: str  # "preset" or an absolute path
    eval_data: str | None
    seed: int
    device: str | None
    student: str | None = None
    """Initial student when there is no prune stage (e.g. with an API teacher)."""
    unlabelled: list[str] | None = None
    """More inputs for the label stage (absolute paths): lines with the task's input fields only."""
    eval_part: str | None = None
    """`validation` or `test`: score that part of the dev set (eval_data, else data) and train on
    none of its validation and test lines (data.dev_part)."""
    stages: dict = field(default_factory=dict)
    """stage name -> options dict (validated)."""
    raw: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    """Set only by `slm build --trust-remote-code`: stages may run code from model folders."""


def _to_python(node, path: Path):
    import yaml

    if isinstance(node, yaml.MappingNode):
        out = Node()
        out.lines = {}
        for k, v in node.value:
            key = _to_python(k, path)
            if key in out:
                raise UsageError(f"{path}:{k.start_mark.line + 1}: key `{key}` appears twice")
            out[key] = _to_python(v, path)
            out.lines[key] = k.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, path) for v in node.value]
    return yaml.SafeLoader("").construct_object(node, deep=True)  # int, float, bool, null, str


def read_yaml(path: Path) -> Node:
    import yaml

    try:
        root = yaml.compose(read_text(path, "recipe"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise UsageError(f"{path}: a recipe is a YAML mapping (name:, teacher:, task:, stages: ...)")
    return _to_python(root, path)


# the kinds of value YAML gives, as an error message names them
KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "text", list: "a list",
         tuple: "a list", dict: "a mapping"}


def _members(hint) -> tuple:
    """`int | None` -> (int, NoneType); `list[str]` -> (list,); a plain class -> (it,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(hint) for m in _members(a))
    return (typing.get_origin(hint) or hint,)


def _hint_ok(value, hint) -> bool:
    """Whether a YAML value fits an option's annotation. Classes YAML cannot give (a Task) are
    left to the stage."""
    for kind in _members(hint):
        if kind is type(None):
            if value is None:
                return True
        elif kind not in KINDS or _fits(value, kind):
            return True
    return False


def _fits(value, kind) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python; only a true/false option takes it
        return kind is bool
    return isinstance(value, {float: (int, float), tuple: list}.get(kind, kind))


def _hint_name(hint) -> str:
    return " or ".join(dict.fromkeys(KINDS[k] for k in _members(hint) if k in KINDS)) or "another value"


# stage -> (module, config dataclass): its fields are the stage's options and its verb's flags
CONFIGS = {"generate": ("slmkit.generate", "GenerateConfig"),
           "tune_teacher": ("slmkit.distill", "DistillConfig"),
           "label": ("slmkit.generate", "GenerateConfig"), "prune": ("slmkit.prune", "PruneConfig"),
           "distill": ("slmkit.distill", "DistillConfig"), "export": ("slmkit.export", "ExportConfig"),
           "eval": ("slmkit.evaluate", "EvalConfig")}


def _stage_api(stage: str) -> dict[str, tuple[dataclasses.Field, object]]:
    """name -> (field, type annotation) of the options a recipe may set: the fields of the
    stage's config that `slm build` does not wire itself."""
    module, name = CONFIGS[stage]
    config = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(config)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(config)
            if not f.metadata["wired"]}


def check_name(name: str, where: str) -> str:
    """A run name must stay inside --runs: letters, digits, `.`, `_`, `-`; no `/`, no `..`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise UsageError(f"{where}: name: {name!r} is not a safe run folder name; use letters, "
                         "digits, `.`, `_` and `-` (e.g. `name: demo`), no `/` or `..`")
    return name


def _check_stage(stage: str, node, path: Path, line, trust_remote_code: bool = False) -> dict:
    if node is None:
        return {}
    if not isinstance(node, Node):
        raise UsageError(f"{path}:{line}: stages.{stage}: expected a mapping of options, "
                         f"got {type(node).__name__}")
    allowed = _stage_api(stage)
    for key, value in node.items():
        where = f"{path}:{node.line(key)}: stages.{stage}.{key}"
        if key == "enabled":
            if not isinstance(value, bool):
                raise UsageError(f"{where}: expected true/false")
            continue
        if key == "trust_remote_code":
            # running a model folder's code is the caller's decision, never the recipe's alone
            if value is not False and not trust_remote_code:
                raise UsageError(f"{where}: a recipe cannot allow code from model folders by itself; "
                                 "pass `slm build --trust-remote-code` to allow it")
            continue
        if key not in allowed:
            raise UsageError(f"{where}: unknown option; allowed: {', '.join(sorted(allowed))}")
        option, hint = allowed[key]
        if not _hint_ok(value, hint):  # the annotation, not the default: `int | str = "auto"`
            raise UsageError(f"{where}: expected {_hint_name(hint)}, got {value!r}")
        choices = option.metadata["argparse"].get("choices")
        if choices and value not in choices:
            raise UsageError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        why = check_value(option, value)  # the config's own range, here before any stage runs
        if why:
            raise UsageError(f"{where}: {value!r} {why}")
    # the command-line flag, not the recipe, wires trust_remote_code (see pipeline._train)
    return {k: v for k, v in node.items() if k != "trust_remote_code"}


def load_recipe(path: str | Path, trust_remote_code: bool = False) -> Recipe:
    """trust_remote_code: the caller's `--trust-remote-code`; without it a recipe that asks to
    run code from model folders is refused."""
    path = Path(path)
    doc = read_yaml(path)
    for key in doc:
        if key not in TOP_KEYS:
            raise UsageError(f"{path}:{doc.line(key)}: unknown key `{key}`; allowed: "
                             f"{', '.join(sorted(TOP_KEYS))}")
    needs = {"teacher": "a MODEL (a model folder, a .gguf file, `default` or openai:NAME@URL)",
             "task": "a preset name or a mapping", "stages": "a mapping of stages to options"}
    for key, what in needs.items():
        if key not in doc:
            raise UsageError(f"{path}: missing key `{key}`")
        if doc[key] in (None, ""):  # `teacher:` with nothing after it
            raise UsageError(f"{path}:{doc.line(key)}: {key}: empty; give {what}")
    name = check_name(_text(doc, path, "name", path.stem),
                      f"{path}:{doc.line('name')}" if "name" in doc else
                      f"{path} (no `name:`, so the file name is used)")
    teacher = _model_spec(doc, path, "teacher")
    task = _task(doc, path, name)
    data = _data_path(doc, path, "data") or "preset"
    if data == "preset":
        from slmkit.tasks import preset_data

        try:
            preset_data(task.name)
        except UsageError as e:
            raise UsageError(f"{path}:{doc.line('data') or doc.line('task')}: data: {e}") from None
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"{path}:{doc.line('seed')}: `seed` must be an integer")
    stages = _stages(doc, path, trust_remote_code)
    if teacher.startswith("openai:") and set(stages) - {"generate", "label", "distill", "eval", "export"}:
        raise UsageError(f"{path}:{doc.line('teacher')}: an API teacher (openai:...) has no weights "
                         "to tune or prune; use only generate/label/distill/eval/export and set "
                         "`student:`")
    unlabelled = _unlabelled(doc, path)
    if unlabelled and "label" not in stages:
        raise UsageError(f"{path}:{doc.line('unlabelled')}: unlabelled: inputs for the teacher to "
                         "answer need a `label` stage (e.g. `label: {}` under stages)")
    eval_part = _text(doc, path, "eval_part")
    if eval_part is not None and eval_part not in EVAL_PARTS:
        raise UsageError(f"{path}:{doc.line('eval_part')}: eval_part: {eval_part!r} is not one of "
                         f"{', '.join(EVAL_PARTS)} (choose settings on validation, report test)")
    eval_data = _data_path(doc, path, "eval_data")
    if eval_part and data == "preset" and not eval_data:
        raise UsageError(f"{path}:{doc.line('eval_part')}: eval_part: needs a dev set to split; "
                         "give `eval_data:` (or `data:`) a JSONL file")
    return Recipe(path=path, name=name, teacher=teacher, task=task, data=data, eval_part=eval_part,
                  eval_data=eval_data, unlabelled=unlabelled, seed=seed,
                  device=_text(doc, path, "device"), student=_model_spec(doc, path, "student"),
                  stages=stages, raw=_plain(doc), trust_remote_code=trust_remote_code)


def _text(doc: Node, path: Path, key: str, default=None) -> str | None:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{path}:{doc.line(key)}: `{key}` must be text, got {value!r}")
    return value


def _model_spec(doc: Node, path: Path, key: str) -> str | None:
    """A MODEL as given; a relative model path is read from the recipe's folder when it is there."""
    spec = _text(doc, path, key)
    if spec is None or spec == "default" or spec.startswith("openai:") or Path(spec).is_absolute():
        return spec
    candidate = path.parent / spec
    return str(candidate.resolve()) if candidate.exists() else spec


def _data_path(doc: Node, path: Path, key: str) -> str | None:
    """`preset`, None, or the absolute path of an existing JSONL file (relative to the recipe)."""
    value = _text(doc, path, key)
    if value is None or value == "preset":
        return value
    mine = value.startswith(DATA_VAR + "/")
    p = data_dir() / value[len(DATA_VAR) + 1:] if mine else Path(value).expanduser()
    p = p if p.is_absolute() else path.parent / p
    if mine and not p.is_file():
        source = _text(doc, path, "data_source") or "a data file that slmkit does not ship"
        raise UsageError(f"{path}:{doc.line(key)}: {key}: this recipe needs {source}; put "
                         f"`{p.name}` in {p.parent} (the folder SLMKIT_DATA names, ./data by "
                         f"default) or copy the recipe and point `{key}:` at your file")
    if p.is_dir():
        raise UsageError(f"{path}:{doc.line(key)}: {key}: `{value}` is a folder; give a "
                         "JSONL file")
    if not p.is_file():
        raise UsageError(f"{path}:{doc.line(key)}: {key}: file `{value}` does not exist "
                         f"(relative paths are read from the recipe's folder)")
    return str(p.resolve())


def _unlabelled(doc: Node, path: Path) -> list[str] | None:
    """`unlabelled:` as one JSONL path or a list of them; each checked as `data:` is."""
    value = doc.get("unlabelled")
    if value is None:
        return None
    if not isinstance(value, list):
        return [_data_path(doc, path, "unlabelled")]
    if not value or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{path}:{doc.line('unlabelled')}: unlabelled: give a JSONL path or a "
                         "list of them")
    out = []
    for v in value:  # each item read as a one-key document, so errors name the same line and key
        one = Node({"unlabelled": v, **{k: doc[k] for k in ("data_source",) if k in doc}})
        one.lines = {"unlabelled": doc.line("unlabelled"), "data_source": doc.line("data_source")}
        out.append(_data_path(one, path, "unlabelled"))
    return out


def _task(doc: Node, path: Path, name: str):
    """`task:` as a preset name or a mapping of the Task's fields (named `name` by default)."""
    from slmkit.tasks import Task, get_task

    node, where = doc["task"], f"{path}:{doc.line('task')}"
    if isinstance(node, str):
        try:
            return get_task(node)
        except UsageError as e:
            raise UsageError(f"{where}: task: {e}") from None
    if not isinstance(node, Node):
        raise UsageError(f"{where}: `task` must be a preset name or a mapping")
    allowed = {"name", "template", "target", "metric", "references_field", "description"}
    for key in node:
        if key not in allowed:
            raise UsageError(f"{path}:{node.line(key)}: task.{key}: unknown key; "
                             f"allowed: {', '.join(sorted(allowed))}")
    for key in ("template", "target", "metric"):
        if not isinstance(node.get(key), str):
            raise UsageError(f"{where}: task.{key}: required text")
    try:
        return Task(name=node.get("name", name), template=node["template"], target=node["target"],
                    metric=node["metric"], references_field=node.get("references_field"),
                    description=node.get("description", ""))
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


def _stages(doc: Node, path: Path, trust_remote_code: bool) -> dict:
    """stage -> its checked options, in pipeline order whatever the file's; `enabled: false` ones left out."""
    node = doc["stages"]
    if not isinstance(node, Node) or not node:
        raise UsageError(f"{path}:{doc.line('stages')}: `stages` must map stage names to options")
    for stage in node:
        if stage not in STAGES:
            raise UsageError(f"{path}:{node.line(stage)}: unknown stage `{stage}`; "
                             f"stages: {', '.join(STAGES)}")
    stages = {}
    for stage in (s for s in STAGES if s in node):
        opts = _check_stage(stage, node[stage], path, node.line(stage), trust_remote_code)
        if opts.pop("enabled", True):
            stages[stage] = opts
    return stages


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
