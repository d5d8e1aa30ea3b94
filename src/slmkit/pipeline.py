"""Run a recipe end to end: generate -> tune_teacher -> label -> prune -> distill -> export -> eval.

    slm build                          # the built-in demo: recipes/demo.yaml
    slm build recipes/grammar.yaml
    slm build recipes/demo.yaml --from distill   # rerun distill and everything after it

Everything a run makes lives in one folder, `runs/NAME/`: the resolved recipe, `data/`,
`teacher_tuned/`, `pruned/`, `student/`, `export/`, `report/` and `manifest.json` (per stage:
status, input fingerprint, outputs, seconds; `final`: the models, the data distill read, the
report). A rerun skips every finished stage whose inputs (its options, the upstream stage's
fingerprint, the teacher and data files) are unchanged; a killed run resumes at the unfinished
stage, and a training stage resumes from its checkpoint.
Export comes before eval: the report scores the exported student and teacher through llama.cpp
beside the PyTorch models, so it shows what a laptop user gets.

A few labelled examples and many unlabelled inputs: with a `label` stage, the data's lines whose
task target is missing or empty (never those marked "split": "eval") wait for the tuned teacher,
which answers them after tune_teacher, with the lines of the recipe's `unlabelled:` file (inputs
only); distill then trains on both (stage_label).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slmkit import models
from slmkit.backends import MAX_LOGPROBS
from slmkit.cli import add_config_arguments, config_from_args, option
from slmkit.errors import UsageError
from slmkit.recipe import STAGES, Recipe, check_name, load_recipe

DEMO = Path(__file__).parent / "recipes" / "demo.yaml"


@dataclass
class BuildConfig:
    """One `slm build` run; CLI flags are these names with dashes."""

    recipe: str | None = option(None, "recipe YAML (default: the built-in demo, recipes/demo.yaml)",
                                flags=("recipe",), nargs="?")
    from_stage: str | None = option(None, "rerun this stage and every later one even if unchanged",
                                    flags=("--from",), choices=STAGES)
    runs: str = option("runs", "folder holding run folders (default: runs)")
    device: str | None = option(None, "cpu or cuda (default: cuda when present)")
    trust_remote_code: bool = option(False, "let the stages run Python code shipped in model folders "
                                     "(auto_map); only for models you trust")


def add_arguments(p):
    add_config_arguments(p, BuildConfig)


def run(args) -> int:
    cfg = config_from_args(BuildConfig, args)
    recipe = load_recipe(cfg.recipe or DEMO, trust_remote_code=cfg.trust_remote_code)
    if cfg.device:
        recipe.device = cfg.device
    result = build(recipe, runs=cfg.runs, from_stage=cfg.from_stage)
    print_summary(result)
    return 0


# --------------------------------------------------------------------------- fingerprints

def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(spec: str) -> str:
    """Cheap identity of a model: file names, sizes and mtimes (weights are not hashed)."""
    if models.is_name(spec):
        spec = str(models.gguf_path(spec))
    if spec.startswith("openai:"):
        return spec
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
    else:
        files = [p] if p.is_file() else []
    return _sha([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files] or spec)


# --------------------------------------------------------------------------- manifest

class Manifest:
    """runs/NAME/manifest.json, rewritten atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data = (models.read_json(path, fix="delete it to run every stage again")
                     if path.is_file() else {"stages": {}})

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def update(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        with models.atomic_write(self.path) as f:
            json.dump(self.data, f, indent=2)


@dataclass
class Context:
    """What the stages hand each other."""

    recipe: Recipe
    run_dir: Path
    teacher: str  # the original teacher
    tuned: str | None = None  # the teacher after teacher correction
    student: str | None = None
    data: str = ""  # training data (JSONL)
    unlabelled: str | None = None  # the data's lines without a target, for the label stage
    eval_data: str = ""
    eval_split: str | None = "eval"
    keep_out: str | None = None  # eval lines the teacher's data stays clear of (eval_part: both)
    report: str | None = None
    gguf: str | None = None
    teacher_cache: str | None = None  # the generate stage's top-k of the teacher (topk_cache)
    teacher_gguf: str | None = None  # the teacher exported in the student's quant, for the report
    fresh: bool = True
    """The running stage starts over: its partial outputs are from other inputs (or none)."""

    @property
    def task_arg(self):
        from slmkit.tasks import PRESETS

        task = self.recipe.task
        return task.name if PRESETS.get(task.name) == task else task

    @property
    def best_teacher(self) -> str:
        return self.tuned or self.teacher


# --------------------------------------------------------------------------- stages

def stage_generate(ctx: Context, opts: dict) -> dict:
    from slmkit.generate import GenerateConfig, generate

    out = ctx.run_dir / "data" / "generated.jsonl"
    if ctx.fresh:  # rows written under other options must not count as done
        for f in out.parent.glob("generated.*"):  # the output and its side files
            f.unlink()
    cfg = GenerateConfig(teacher=ctx.teacher, task=ctx.task_arg, inputs=ctx.data, out=str(out),
                         decontaminate=ctx.keep_out or (ctx.eval_data if ctx.eval_split is None
                                                        else None),
                         trust_remote_code=ctx.recipe.trust_remote_code,
                         **{"seed": ctx.recipe.seed, **opts})
    stats = generate(cfg)
    return {"data": str(out), "stats": stats, "teacher_cache": stats.get("topk_cache")}




def stage_label(ctx: Context, opts: dict) -> dict:
    """The tuned teacher (else the recipe's) answers the data's unlabelled lines through generate:
    greedy unless the stage's `n` asks for best-of-N, the eval set kept out. Writes under data/
    teacher.jsonl (generate's output), teacher.topk.safetensors (its top-k log-probs in the
    `--teacher-cache` format, for `slm distill --data data/teacher.jsonl`; `topk_logprobs: 0`
    turns it off) and combined.jsonl (the data's lines, then the teacher's marked `meta.source:
    teacher`), which prune and distill read. A GGUF teacher also scores the human lines
    (human.topk.safetensors) and both files become combined.topk.safetensors, which the build's
    distill reads instead of running the teacher (with nothing to label: the human lines' file
    alone). Other teachers teach distill online: a --teacher-cache must cover every line."""
    folder = ctx.run_dir / "data"
    # the recipe's teacher decides: a GGUF one teaches from file even when tune_teacher made a
    # folder of it (the tuned teacher is what answers and scores)
    cached = (opts.get("topk_logprobs", MAX_LOGPROBS) and "distill" in ctx.recipe.stages
              and gguf_teacher(ctx.teacher))
    if not ctx.unlabelled:
        _log("[label] no line without a target: nothing to label")
        if not cached:
            return {"data": ctx.data, "labelled": 0}
        # the teacher still reads every human line once, so distill needs no teacher forward
        cache = _score_human_lines(ctx, folder / "teacher.topk.safetensors")
        return {"data": ctx.data, "labelled": 0, "teacher_cache": str(cache)}
    from slmkit.generate import GenerateConfig, generate

    out = folder / "teacher.jsonl"
    if ctx.fresh:  # answers written under other inputs must not count as done
        for f in folder.glob("teacher.*"):
            f.unlink()
    eval_set = ctx.keep_out or (ctx.eval_data if ctx.eval_split is None else
                                _held_out_lines(ctx.eval_data, folder / "heldout.jsonl"))
    opts = {"n": 1, "topk_logprobs": MAX_LOGPROBS, **opts}
    if opts["n"] == 1:
        opts.setdefault("temperature", 0.0)
    stats = generate(GenerateConfig(teacher=ctx.best_teacher, task=ctx.task_arg,
                                    inputs=ctx.unlabelled, out=str(out), decontaminate=eval_set,
                                    trust_remote_code=ctx.recipe.trust_remote_code,
                                    **{"seed": ctx.recipe.seed, **opts}))
    from slmkit import topk_cache
    from slmkit.data import read_jsonl

    answered = [row for _, row in read_jsonl(out)] if out.is_file() and out.read_text().strip() else []
    combined = folder / "combined.jsonl"
    with models.atomic_write(combined) as f:
        human = Path(ctx.data).read_text()
        f.write(human if human.endswith("\n") else human + "\n")  # same lines, same line numbers
        for row in answered:
            row = {k: v for k, v in row.items() if k != "teacher_topk"}  # the cache holds it
            row["meta"] = {**row.get("meta", {}), "source": "teacher"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    _log(f"[label] the teacher answered {len(answered)} of {stats['inputs']} unlabelled lines "
         f"(dropped: {json.dumps(stats['dropped'])})")
    outputs = {"data": str(combined), "labelled": len(answered), "teacher_data": str(out),
               "stats": stats}
    if cached and stats.get("topk_cache"):
        # one file of the top-k captured while it answered and of the human lines
        human = _score_human_lines(ctx, folder / "human.topk.safetensors")
        outputs["teacher_cache"] = str(topk_cache.merge([stats["topk_cache"], human],
                                                        folder / "combined.topk.safetensors"))
    return outputs


def gguf_teacher(teacher: str) -> bool:
    """A packaged name or .gguf teacher: a model too big to run beside the student at every
    step, and already the file a laptop runs. The label stage writes its top-k for distill; the
    report scores the file as it is. A folder and `default` teach online, with their full
    distributions."""
    return teacher != models.DEFAULT and models.gguf_path(teacher) is not None


def _score_human_lines(ctx: Context, dest: Path) -> Path:
    """The teacher's top-k on the human lines (teacher-forced: one batched pass over each line's
    prompt and reference), written to `dest` with the max_length distill will read them at."""
    from slmkit.distill import DistillConfig, cache_teacher

    dist = ctx.recipe.stages["distill"]
    cfg = DistillConfig(student=ctx.best_teacher, teacher=ctx.best_teacher, data=ctx.data,
                        task=ctx.task_arg, out=str(dest), device=ctx.recipe.device,
                        batch_size=8, trust_remote_code=ctx.recipe.trust_remote_code,
                        **{k: dist[k] for k in ("max_length", "eval_fraction", "eval_max")
                           if k in dist})
    _log(f"[label] the teacher's top-k on the {ctx.data and Path(ctx.data).name} lines")
    return cache_teacher(cfg, dest, k=MAX_LOGPROBS)


def _held_out_lines(path: str, out: Path) -> str | None:
    """The lines of `path` marked "split": "eval", written to `out` (None when there are none):
    the eval set generate keeps out of the data."""
    from slmkit.data import read_jsonl

    held = [row for _, row in read_jsonl(path) if row.get("split") == "eval"]
    if not held:
        return None
    with models.atomic_write(out) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in held)
    return str(out)


def _train(ctx: Context, opts: dict, *, student: str, teacher: str | None, out: Path, **wired):
    from slmkit.distill import DistillConfig, distill

    # a run killed with these same inputs left OUT.work/checkpoint behind: distill continues
    # from it exactly; a fresh stage (changed inputs, --from) trains from scratch
    cfg = DistillConfig(student=student, teacher=teacher, data=ctx.data, task=ctx.task_arg,
                        out=str(out), device=ctx.recipe.device, restart=ctx.fresh,
                        trust_remote_code=ctx.recipe.trust_remote_code,
                        **{"seed": ctx.recipe.seed, **wired, **opts})
    return str(distill(cfg))


def stage_tune_teacher(ctx: Context, opts: dict) -> dict:
    # Minitron's "teacher correction": a short fine-tune of the teacher on the task data, so the
    # distributions the student learns from match the task's distribution.
    out = _train(ctx, opts, student=ctx.teacher, teacher=None, out=ctx.run_dir / "teacher_tuned",
                 alpha_ce=1.0)
    return {"tuned": out}


def stage_prune(ctx: Context, opts: dict) -> dict:
    from slmkit.prune import PruneConfig, prune

    out = ctx.run_dir / "pruned"
    plan = prune(PruneConfig(ctx.best_teacher, str(out), calib=ctx.data or None,
                             device=ctx.recipe.device, trust_remote_code=ctx.recipe.trust_remote_code,
                             **{"seed": ctx.recipe.seed, **opts}))
    return {"student": str(out), "parameters": plan.get("parameters_after")}


def stage_distill(ctx: Context, opts: dict) -> dict:
    """A served or GGUF teacher whose top-k the generate stage captured (every line of the data
    is the teacher's) or the label stage wrote (its answers and the human lines) teaches from
    that file: no prompt log-probs are asked of a server, no 1.5B runs beside the student.
    Otherwise the teacher is asked online (a served one with vLLM's prompt_logprobs)."""
    from slmkit.served_teacher import is_served

    init = ctx.student or ctx.best_teacher
    teacher, wired = ctx.best_teacher, {}
    if (is_served(teacher) or gguf_teacher(ctx.teacher)) and ctx.teacher_cache \
            and Path(ctx.teacher_cache).is_file():
        teacher, wired = None, {"teacher_cache": ctx.teacher_cache}
        opts = {k: v for k, v in opts.items() if k != "teacher_tokenizer"}  # the file aligns itself
    out = _train(ctx, opts, student=init, teacher=teacher, out=ctx.run_dir / "student", **wired)
    return {"student": out}


def stage_eval(ctx: Context, opts: dict) -> dict:
    from slmkit.evaluate import EvalConfig, evaluate

    specs, names = [], []
    if ctx.tuned:
        specs.append(ctx.tuned)
        names.append("teacher (tuned)")
    specs.append(ctx.teacher)
    names.append("teacher (zero-shot)")
    if ctx.student:
        specs.append(ctx.student)
        names.append("student")
    if ctx.gguf:  # the exported files, run through llama.cpp as `slm chat` and Ollama run them
        quant = ctx.recipe.stages["export"].get("quant", EXPORT_QUANT)
        opts = {"engine": "llamacpp", **opts}
        opts["engine"] = models.pick_engine(opts["engine"], ctx.recipe.device)
        if opts["engine"] == "llamacpp" and ctx.teacher == models.DEFAULT:
            # the embedded default is itself a GGUF: its zero-shot row stays on PyTorch, so only
            # the exports' rows are llama.cpp's (another GGUF teacher's row is its own file as a
            # laptop runs it)
            specs[names.index("teacher (zero-shot)")] = str(models.resolve(
                ctx.teacher, trust_remote_code=ctx.recipe.trust_remote_code))
        engine = "llama.cpp" if opts["engine"] == "llamacpp" else "torch"
        if ctx.teacher_gguf:
            specs.append(ctx.teacher_gguf)
            names.append(f"teacher {quant} ({engine})")
        specs.append(ctx.gguf)
        names.append(f"{'student' if ctx.student else 'teacher'} {quant} ({engine})")
    out = ctx.run_dir / "report"
    evaluate(EvalConfig(specs, names=names, task=ctx.task_arg, data=ctx.eval_data,
                        split=ctx.eval_split, out=str(out), device=ctx.recipe.device,
                        trust_remote_code=ctx.recipe.trust_remote_code, **opts))
    if gguf_teacher(ctx.teacher) and ctx.gguf and ctx.student and ctx.eval_data:
        # the teacher's file and the student's, as a laptop runs them: what one query costs
        from slmkit import scorecard

        metrics = models.read_json(out / "metrics.json", fix="run the eval stage again")
        exported = names[-1]
        costs = scorecard.measure({"teacher (zero-shot)": models.gguf_path(ctx.teacher),
                                   exported: Path(ctx.gguf)})
        card = scorecard.build(metrics, "teacher (zero-shot)", exported, costs)
        scorecard.write(out, card)
        _log(f"[eval] {card['headline']} ({out / 'scorecard.md'})")
    return {"report": str(out)}


# it kept the demo student's ROUGE-L (docs/notes/2026-11-26-prune-eval-export-serve.md)
EXPORT_QUANT = "q4_k_m"


def stage_export(ctx: Context, opts: dict) -> dict:
    from slmkit.export import ExportConfig, export

    opts = {"quant": EXPORT_QUANT, "trust_remote_code": ctx.recipe.trust_remote_code, **opts}
    folder = ctx.run_dir / "export"
    out = folder / f"{ctx.recipe.name}-student-{opts['quant']}.gguf"
    export(ExportConfig(ctx.student or ctx.best_teacher, str(out), **opts))
    if not ctx.student or ctx.best_teacher.startswith("openai:"):  # an API teacher has no weights
        return {"gguf": str(out)}
    if gguf_teacher(ctx.teacher):
        # a GGUF teacher is already the file a laptop runs: eval and the scorecard run it. Tuned,
        # it is scored in PyTorch alone: its LoRA update did not survive q4_k_m (DialogSum
        # ROUGE-L 36.7 -> 31.2), and each 1.5B row is minutes of the eval stage
        return {"gguf": str(out)}
    # the teacher in the same quant: the report compares like with like
    teacher = folder / f"{ctx.recipe.name}-teacher-{opts['quant']}.gguf"
    export(ExportConfig(ctx.best_teacher, str(teacher), **opts))
    return {"gguf": str(out), "teacher_gguf": str(teacher)}


RUNNERS = {"generate": stage_generate, "tune_teacher": stage_tune_teacher, "label": stage_label,
           "prune": stage_prune, "distill": stage_distill, "export": stage_export, "eval": stage_eval}
# what each stage's outputs set in the context, and which must exist for a skip to be safe
OUTPUT_PATHS = {"generate": ("data",), "tune_teacher": ("tuned",), "label": ("data",),
                "prune": ("student",), "distill": ("student",), "export": ("gguf",),
                "eval": ("report",)}


def _apply(ctx: Context, outputs: dict) -> None:
    for key, value in outputs.items():
        if hasattr(ctx, key) and key not in ("recipe", "run_dir"):
            setattr(ctx, key, value)


def build(recipe: Recipe, runs: str | Path = "runs", from_stage: str | None = None) -> dict:
    """Run (or resume) a recipe; returns the manifest data."""
    from slmkit.tasks import preset_data

    run_dir = Path(runs) / check_name(recipe.name, f"{recipe.path}")
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    with models.atomic_write(run_dir / "recipe.yaml") as f:
        yaml.safe_dump(recipe.raw | {"resolved": {"teacher": recipe.teacher, "data": recipe.data}},
                       f, sort_keys=False)
    manifest = Manifest(run_dir / "manifest.json")
    data = str(preset_data(recipe.task.name)) if recipe.data == "preset" else recipe.data
    more, parts = recipe.unlabelled, None
    if recipe.eval_part:
        data, more, parts = split_dev(recipe, data, run_dir / "data")
    unlabelled = None
    if "label" in recipe.stages:
        if "topics" in recipe.stages["label"]:
            raise UsageError(f"{recipe.path}: stages.label.topics: the label stage answers the "
                             "data's lines that have no target; give topics to the generate stage")
        data, unlabelled = split_unlabelled(data, recipe.task, run_dir / "data", more)
    if parts:
        _log(f"[eval] the {recipe.eval_part} part of {Path(recipe.eval_data or recipe.data).name} "
             f"is scored ({parts[recipe.eval_part]}); no line of its validation or test part is "
             "trained on")
        eval_data, eval_split = parts[recipe.eval_part], None
    elif recipe.eval_data:
        eval_data, eval_split = recipe.eval_data, None
    else:  # held out from the labelled lines only: eval needs references
        data = ensure_split(data, run_dir / "data" / "split.jsonl")
        eval_data, eval_split = data, "eval"
    ctx = Context(recipe=recipe, run_dir=run_dir, teacher=recipe.teacher, data=data,
                  unlabelled=unlabelled, eval_data=eval_data, eval_split=eval_split,
                  keep_out=parts and parts["heldout"])
    if recipe.student:
        ctx.student = recipe.student
    preflight(recipe)
    from slmkit.data import file_hash

    upstream = _sha({"teacher": model_fingerprint(recipe.teacher), "task": repr(recipe.task),
                     "data": file_hash(data), "eval": file_hash(ctx.keep_out or ctx.eval_data),
                     "seed": recipe.seed})
    forced = False
    total = time.time()
    for stage in STAGES:
        if stage not in recipe.stages:
            continue
        opts = recipe.stages[stage]
        # label also reads what no upstream key covers: the teacher's files, the unlabelled lines
        reads = ({"teacher": model_fingerprint(ctx.best_teacher),
                  "unlabelled": ctx.unlabelled and file_hash(ctx.unlabelled)}
                 if stage == "label" else {})
        if stage == "eval" and ctx.keep_out:  # the part scored: switching it reruns eval alone
            reads = {"eval_data": file_hash(ctx.eval_data)}
        keyed = opts  # the engine that runs, not the word: `engine: auto` keys as what it picks
        if "engine" in opts:
            keyed = opts | {"engine": models.pick_engine(opts["engine"], recipe.device)}
        key = _sha({"stage": stage, "opts": keyed, "upstream": upstream} | reads)
        upstream = key
        forced = forced or stage == from_stage
        entry = manifest.stage(stage)
        outputs_exist = all(Path(entry.get("outputs", {}).get(k, "")).exists()
                            for k in OUTPUT_PATHS[stage]) if entry else False
        if entry.get("status") == "done" and entry.get("key") == key and outputs_exist and not forced:
            _log(f"[{stage}] unchanged, skipped ({entry.get('seconds', 0):.0f} s last time)")
            _apply(ctx, entry["outputs"])
            continue
        # partial outputs are reused only by the same stage inputs, and never under --from
        ctx.fresh = forced or entry.get("key") != key
        resuming = not ctx.fresh and entry.get("status") != "done"
        _log(f"[{stage}] running" + (" (resuming)" if resuming else ""))
        start = time.time()
        manifest.update(stage, status="running", key=key, started=time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            outputs = RUNNERS[stage](ctx, opts)
        except BaseException as e:
            manifest.update(stage, status="failed" if isinstance(e, Exception) else "interrupted",
                            error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        _apply(ctx, outputs)
        manifest.update(stage, status="done", outputs=outputs, seconds=round(time.time() - start, 1),
                        error=None)
        _log(f"[{stage}] done in {time.time() - start:.0f} s")
    manifest.data["final"] = {"run_dir": str(run_dir), "seconds": round(time.time() - total, 1),
                              "teacher": ctx.teacher, "tuned": ctx.tuned, "student": ctx.student,
                              "data": ctx.data, "report": ctx.report, "gguf": ctx.gguf}
    manifest.save()
    return manifest.data


def preflight(recipe: Recipe) -> None:
    """Before the first stage runs, check that every stage can take the model it will get, so a
    recipe does not fail at export after an hour of distillation: the teacher's family for prune
    (archs.get), its logit processing for training (archs.logit_post), and for export each model it writes (the student has the teacher's family when
    pruned from it, else `student:`; the teacher too when a student is exported beside it): the
    family, GGUF architecture, rope, tokenizer and quant (export.check_exportable). Config files
    and tokenizers only, no weights (a .gguf teacher is converted once, as its stages would)."""
    from slmkit import archs

    local = not recipe.teacher.startswith("openai:")
    trust = recipe.trust_remote_code
    if local and {"prune", "tune_teacher", "distill"} & set(recipe.stages):
        folder = models.resolve(recipe.teacher, trust_remote_code=trust)
        config, where = models.read_config(folder), f"{recipe.path}: teacher {recipe.teacher}"
        if "prune" in recipe.stages:
            archs.get(config, f"{where} ({folder}/config.json)", "prune")
        try:  # training applies the head outside the model (archs.head_outside)
            archs.logit_post(config)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
    if "export" not in recipe.stages:
        return
    from slmkit.export import check_exportable

    quant = recipe.stages["export"].get("quant", EXPORT_QUANT)
    student = recipe.teacher if "prune" in recipe.stages or not recipe.student else recipe.student
    # a GGUF teacher is scored as it is, not exported
    teacher = [] if gguf_teacher(recipe.teacher) else [recipe.teacher]
    exported = [m for m in dict.fromkeys([student] + teacher) if not m.startswith("openai:")]
    for model in exported:
        try:
            check_exportable(model, quant, trust_remote_code=trust)
        except UsageError as e:
            raise UsageError(f"{recipe.path}: stages.export: {model}: {e}") from None


def split_unlabelled(path: str, task, folder: Path,
                     more: list[str] | None = None) -> tuple[str, str | None]:
    """(labelled data, unlabelled inputs): the lines whose task target is missing or empty go to
    `folder`/unlabelled.jsonl, the rest to `folder`/human.jsonl; the lines of `more` (the
    recipe's `unlabelled:` files, inputs only) follow them in unlabelled.jsonl. A line marked
    "split": "eval" always stays with the data, so the eval set is never labelled into training.
    With nothing to label, (path, None): the data is used as it is."""
    from slmkit.data import read_jsonl

    rows = read_jsonl(path)
    todo = {n for n, row in rows if row.get("split") != "eval" and not task.references(row)}
    extra = []
    for file in more or []:
        for n, row in read_jsonl(file):
            if task.references(row):  # a target here would be silently replaced by the teacher's
                raise UsageError(f"{file}:{n}: has a `{task.target}`; the `unlabelled:` file holds "
                                 "inputs only (put labelled lines in `data`)")
            task.check(row, f"{file}:{n}")
            extra.append((n, row))
    if not todo and not extra:
        return path, None
    if len(todo) == len(rows):
        raise UsageError(f"{path}: no line has a `{task.target}`; the label stage needs a few "
                         "labelled lines to tune the teacher and score the student")
    for n, row in rows:
        if n in todo:
            task.check(row, f"{path}:{n}")  # its input fields, named by the data's own line
    human, unlabelled = folder / "human.jsonl", folder / "unlabelled.jsonl"
    with models.atomic_write(human) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for n, row in rows if n not in todo)
    with models.atomic_write(unlabelled) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n"
                     for row in [r for n, r in rows if n in todo] + [r for _, r in extra])
    return str(human), str(unlabelled)


def split_dev(recipe: Recipe, data: str, folder: Path) -> tuple[str, str | None, dict]:
    """`eval_part:`: the dev set (eval_data, else data) cut into its parts by data.dev_part.
    Returns (training data, unlabelled inputs, {"validation", "test": each part's lines,
    "heldout": both}). When the dev set is also the training data, only its train part is
    trained on; when it is also the `unlabelled:` file, its train part's inputs are (their
    references dropped: the teacher answers them)."""
    from slmkit.data import dev_part, read_jsonl

    task, source = recipe.task, recipe.eval_data or data
    rows = read_jsonl(source)
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    for n, row in rows:
        task.check(row, f"{source}:{n}")
        parts[dev_part(task.prompt(row))].append(row)
    out = {}
    for name, lines in (("validation", parts["validation"]), ("test", parts["test"]),
                        ("heldout", parts["validation"] + parts["test"])):
        if name != "heldout" and not lines:
            raise UsageError(f"{source}: no line falls in its {name} part "
                             f"({len(rows)} lines); eval_part needs a dev set of a few dozen lines")
        out[name] = str(folder / f"{name}.jsonl")
        _write_rows(folder / f"{name}.jsonl", lines)
    if not recipe.eval_data:
        data = str(folder / "train.jsonl")
        _write_rows(Path(data), parts["train"])
    more = list(recipe.unlabelled or [])
    for i, extra in enumerate(more):
        if Path(extra) == Path(source):
            more[i] = str(folder / "dev-inputs.jsonl")
            _write_rows(Path(more[i]), [{f: row[f] for f in task.fields()} for row in parts["train"]])
    return data, more or None, out


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with models.atomic_write(path) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def ensure_split(path: str, out: Path) -> str:
    """Data with lines marked "split": "eval" is used as it is; other data gets its held-out part
    (data.held_out, the rule `slm distill` applies) marked in a copy written to `out`."""
    from slmkit.data import held_out, read_jsonl

    rows = [row for _, row in read_jsonl(path)]
    if any(row.get("split") == "eval" for row in rows):
        return path
    with models.atomic_write(out) as f:
        for row, held in zip(rows, held_out(rows)):
            f.write(json.dumps(row | {"split": "eval" if held else "train"}) + "\n")
    return str(out)


def _log(msg: str) -> None:
    print(f"slm build: {msg}", file=sys.stderr, flush=True)


def print_summary(result: dict) -> None:
    final = result.get("final", {})
    report = final.get("report")
    if report and (Path(report) / "report.md").is_file():
        print((Path(report) / "report.md").read_text())
    if report and (Path(report) / "scorecard.md").is_file():
        print((Path(report) / "scorecard.md").read_text())
    print()
    for label, key in (("report", "report"), ("student", "student"), ("gguf", "gguf")):
        if final.get(key):
            shown = Path(final[key]) / "report.html" if key == "report" else final[key]
            print(f"{label:<8} {shown}")
    if final.get("gguf"):
        print(f"\nchat with it:  slm chat {final['gguf']}")
    elif final.get("student"):
        print(f"\nchat with it:  slm chat {final['student']}")
