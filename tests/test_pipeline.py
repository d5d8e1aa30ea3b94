"""`slm build`: recipe validation, a tiny end-to-end build, skip-on-rerun and resume."""

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from slmkit import pipeline
from slmkit.recipe import load_recipe
from slmkit.errors import UsageError


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def task_data(tmp_path):
    """A few summarize-style lines, train and eval."""
    rows = []
    for i in range(12):
        rows.append({"id": f"d{i}", "split": "eval" if i % 4 == 0 else "train",
                     "dialogue": f"Anna: can you send the report {i}?\nBen: yes, before the meeting.",
                     "summary": f"Ben will send report {i} to Anna before the meeting."})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(tmp_path, teacher, data, extra=""):
    return write(tmp_path / "tiny.yaml", f"""
        name: tiny
        teacher: {teacher}
        task: summarize
        data: {data}
        stages:
          tune_teacher: {{max_steps: 2, batch_size: 4}}
          prune: {{shape: {{layers: 2}}, method: depth, num_samples: 8, seq_len: 32}}
          distill: {{max_steps: 3, batch_size: 4}}
          eval: {{limit: 3, max_new_tokens: 8}}
        {extra}""")


@pytest.mark.parametrize("body, message", [
    ("teacher: default\ntask: summarize\nstages: {prune: {target: 0.5}}\ncolour: blue\n",
     ":4: unknown key `colour`"),
    ("teacher: default\ntask: summarize\nstages:\n  prune:\n    target: 0.5\n    speed: 3\n",
     ":6: stages.prune.speed: unknown option"),
    ("teacher: default\ntask: summarize\nstages:\n  distill:\n    lr: fast\n",
     ":5: stages.distill.lr: expected a number"),
    ("teacher: default\ntask: summarize\ndata: nowhere.jsonl\nstages: {prune: {}}\n",
     ":3: data: file `nowhere.jsonl` does not exist"),
    ("teacher: default\ntask: poetry\nstages: {prune: {}}\n", ":2: task: unknown task `poetry`"),
    ("teacher: default\ntask: summarize\nstages: {polish: {}}\n", ":3: unknown stage `polish`"),
    ("teacher: default\nstages: {prune: {}}\n", "missing key `task`"),
    ("teacher: [unclosed\n", "not valid YAML"),
])
def test_recipe_validation_names_line_and_key(tmp_path, body, message):
    path = write(tmp_path / "bad.yaml", body)
    with pytest.raises(UsageError) as e:
        load_recipe(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_build_cli_bad_recipe_exits_2(cli, tmp_path):
    path = write(tmp_path / "bad.yaml", "teacher: default\ntask: summarize\nstages: {polish: {}}\n")
    code, _, err = cli("build", path)
    assert code == 2 and "bad.yaml:3" in err and "Traceback" not in err


def test_demo_recipe_is_valid():
    recipe = load_recipe(pipeline.DEMO)
    assert recipe.teacher == "default" and recipe.task.name == "summarize"
    assert list(recipe.stages) == ["tune_teacher", "prune", "distill", "export", "eval"]


def test_every_shipped_recipe_loads():
    # a recipe's option of the wrong type or an unknown key is refused at load: every preset
    # recipe that ships must pass, with the stages in pipeline order
    paths = sorted(pipeline.DEMO.parent.glob("*.yaml"))
    assert {p.stem for p in paths} >= {"demo", "grammar", "reply", "qa", "dialogsum"}
    for path in paths:
        try:
            stages = list(load_recipe(path).stages)
        except UsageError as e:  # dialogsum.yaml reads data a user brings ($SLMKIT_DATA)
            if "SLMKIT_DATA" in str(e):
                continue
            raise
        assert stages == sorted(stages, key=list(pipeline.RUNNERS).index), path.name


@pytest.mark.slow
def test_tiny_build_end_to_end_then_skip_then_resume(tmp_path, tiny_llama, task_data, monkeypatch):
    recipe_path = tiny_recipe(tmp_path, tiny_llama, task_data)
    runs = tmp_path / "runs"
    result = pipeline.build(load_recipe(recipe_path), runs=runs)
    run_dir = runs / "tiny"
    stages = result["stages"]
    assert [s for s in stages if stages[s]["status"] == "done"] == [
        "tune_teacher", "prune", "distill", "eval"]
    assert (run_dir / "student" / "config.json").is_file()
    assert json.loads((run_dir / "student" / "config.json").read_text())["num_hidden_layers"] == 2
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert len(metrics["models"]) == 3
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "manifest.json").is_file()

    # rerun: nothing changed, every stage is skipped (a stage that ran would fail here)
    def boom(ctx, opts):
        raise AssertionError("stage ran although its inputs did not change")

    for stage in pipeline.RUNNERS:
        monkeypatch.setitem(pipeline.RUNNERS, stage, boom)
    pipeline.build(load_recipe(recipe_path), runs=runs)
    monkeypatch.undo()

    # change distill's options: distill and eval rerun, the stages before are skipped
    ran = []
    for stage, fn in list(pipeline.RUNNERS.items()):
        monkeypatch.setitem(pipeline.RUNNERS, stage,
                            lambda ctx, opts, fn=fn, stage=stage: ran.append(stage) or fn(ctx, opts))
    changed = write(recipe_path, recipe_path.read_text().replace("max_steps: 3", "max_steps: 4"))
    pipeline.build(load_recipe(changed), runs=runs)
    assert ran == ["distill", "eval"]


@pytest.mark.slow
def test_build_scores_the_exports_through_llamacpp(tmp_path, tiny_llama, task_data, monkeypatch):
    """The report shows what a laptop gets: the exported student and the teacher exported the
    same way, generated and timed by llama.cpp, beside the PyTorch rows."""
    pytest.importorskip("llama_cpp")
    recipe_path = tiny_recipe(tmp_path, tiny_llama, task_data, extra="  export: {quant: q4_k_m}")
    write(recipe_path, recipe_path.read_text().replace("max_new_tokens: 8}",
                                                       "max_new_tokens: 8, speed: true}"))
    runs = tmp_path / "runs"
    result = pipeline.build(load_recipe(recipe_path), runs=runs)
    assert list(result["stages"]) == ["tune_teacher", "prune", "distill", "export", "eval"]
    exported = result["stages"]["export"]["outputs"]
    metrics = json.loads((runs / "tiny" / "report" / "metrics.json").read_text())
    rows = {m["name"]: m for m in metrics["models"]}
    assert list(rows) == ["teacher (tuned)", "teacher (zero-shot)", "student",
                          "teacher q4_k_m (llama.cpp)", "student q4_k_m (llama.cpp)"]
    for name, key in (("teacher q4_k_m (llama.cpp)", "teacher_gguf"),
                      ("student q4_k_m (llama.cpp)", "gguf")):
        row, gguf = rows[name], Path(exported[key])
        assert row["source"] == str(gguf) and row["bytes_on_disk"] == gguf.stat().st_size
        assert row["engines"]["generation"] == "llamacpp" and row["speed"]["engine"] == "llamacpp"
        assert "rougeL" in row["task"]
        assert all(row["speed"][k] > 0 for k in ("decode_tokens_per_s", "ttft_s", "peak_rss_bytes"))
    assert {rows[n]["engines"]["generation"] for n in ("teacher (tuned)", "student")} == {"torch"}
    assert "student q4_k_m (llama.cpp)" in (runs / "tiny" / "report" / "report.md").read_text()

    # eval after export: new eval options rerun eval only; a new quant re-exports and re-scores
    ran = []
    for stage, fn in list(pipeline.RUNNERS.items()):
        monkeypatch.setitem(pipeline.RUNNERS, stage,
                            lambda ctx, opts, fn=fn, stage=stage: ran.append(stage) or fn(ctx, opts))
    write(recipe_path, recipe_path.read_text().replace("speed: true", "speed: false"))
    pipeline.build(load_recipe(recipe_path), runs=runs)
    assert ran == ["eval"]
    ran.clear()
    write(recipe_path, recipe_path.read_text().replace("quant: q4_k_m", "quant: q8_0"))
    pipeline.build(load_recipe(recipe_path), runs=runs)
    assert ran == ["export", "eval"]
    names = [m["name"] for m in json.loads((runs / "tiny" / "report" / "metrics.json").read_text())["models"]]
    assert names[-2:] == ["teacher q8_0 (llama.cpp)", "student q8_0 (llama.cpp)"]


@pytest.mark.parametrize("teacher, exported", [
    ("teacher-folder", ["student-folder", "teacher-folder"]),
    ("openai:big@http://127.0.0.1:8000/v1", ["student-folder"]),  # no weights to export
])
def test_export_stage_exports_the_teacher_beside_the_student(tmp_path, monkeypatch, teacher, exported):
    import types

    calls = []
    monkeypatch.setattr("slmkit.export.export_gguf",
                        lambda model, out, quant, **kw: calls.append((model, Path(out).name)))
    recipe = types.SimpleNamespace(name="r", trust_remote_code=False)
    ctx = pipeline.Context(recipe=recipe, run_dir=tmp_path, teacher=teacher, student="student-folder")
    outputs = pipeline.stage_export(ctx, {"quant": "q8_0"})
    assert [m for m, _ in calls] == exported
    assert Path(outputs["gguf"]).name == "r-student-q8_0.gguf"
    assert ("teacher_gguf" in outputs) == (len(exported) == 2)
    if len(exported) == 2:
        assert calls[1][1] == Path(outputs["teacher_gguf"]).name == "r-teacher-q8_0.gguf"


def test_eval_engine_in_a_recipe_is_checked(tmp_path):
    path = write(tmp_path / "bad.yaml", "teacher: default\ntask: summarize\nstages:\n  eval:\n    engine: vulkan\n")
    with pytest.raises(UsageError) as e:
        load_recipe(path)
    assert ":5:" in str(e.value) and "llamacpp" in str(e.value)


@pytest.mark.slow
def test_interrupted_stage_resumes(tmp_path, tiny_llama, task_data, monkeypatch):
    recipe_path = tiny_recipe(tmp_path, tiny_llama, task_data)
    runs = tmp_path / "runs"
    real_distill = pipeline.RUNNERS["distill"]

    def killed(ctx, opts):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.RUNNERS, "distill", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(load_recipe(recipe_path), runs=runs)
    manifest = json.loads((runs / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "interrupted"
    assert manifest["stages"]["prune"]["status"] == "done"

    ran = []
    for stage, fn in list(pipeline.RUNNERS.items()):
        fn = real_distill if stage == "distill" else fn
        monkeypatch.setitem(pipeline.RUNNERS, stage,
                            lambda ctx, opts, fn=fn, stage=stage: ran.append(stage) or fn(ctx, opts))
    result = pipeline.build(load_recipe(recipe_path), runs=runs)
    assert ran == ["distill", "eval"]
    assert result["stages"]["distill"]["status"] == "done"


# --------------------------------------------------------------------------- untrusted recipes

def test_recipe_cannot_allow_remote_code_by_itself(cli, tmp_path, monkeypatch):
    path = write(tmp_path / "remote.yaml", """
        teacher: default
        task: summarize
        stages:
          distill:
            max_steps: 2
            trust_remote_code: true
        """)
    with pytest.raises(UsageError) as e:
        load_recipe(path)
    assert f"{path}:6: stages.distill.trust_remote_code" in str(e.value)
    assert "slm build --trust-remote-code" in str(e.value)
    code, _, err = cli("build", path, "--runs", tmp_path / "runs")
    assert code == 2 and "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()

    # the command-line flag is what allows it, and it reaches the training stage
    seen = {}
    monkeypatch.setattr("slmkit.distill.distill", lambda cfg: seen.setdefault("cfg", cfg).out)
    for flag in (False, True):
        recipe = load_recipe(write(path, "teacher: default\ntask: summarize\n"
                                         "stages: {distill: {max_steps: 2}}\n"),
                             trust_remote_code=flag)
        ctx = pipeline.Context(recipe=recipe, run_dir=tmp_path, teacher="default", data="d.jsonl")
        pipeline.stage_distill(ctx, recipe.stages["distill"])
        assert seen.pop("cfg").trust_remote_code is flag
    recipe = load_recipe(write(path, path.read_text().replace("{max_steps: 2}",
                                                              "{max_steps: 2, trust_remote_code: true}")),
                         trust_remote_code=True)
    assert recipe.trust_remote_code and recipe.stages["distill"] == {"max_steps": 2}


def test_trust_remote_code_reaches_prune_and_generate(tmp_path, tiny_llama, monkeypatch):
    """`slm build --trust-remote-code` reaches every stage that loads a model folder."""
    import shutil

    from slmkit import models
    from slmkit.prune import PruneConfig, prune

    remote = tmp_path / "remote"  # a folder that asks for its own code
    shutil.copytree(tiny_llama, remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoModelForCausalLM": "x.X"}}))
    with pytest.raises(UsageError, match="--trust-remote-code"):
        prune(PruneConfig(remote, target=0.5, dry_run=True))
    assert prune(PruneConfig(remote, target=0.5, dry_run=True, trust_remote_code=True))["parameters_after"]
    loaded = {}

    def load_folder(folder, **kw):  # stop before any remote code would be imported
        loaded.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_folder", load_folder)
    with pytest.raises(KeyboardInterrupt):
        prune(PruneConfig(remote, tmp_path / "out", target=0.5, task="summarize", trust_remote_code=True))
    assert loaded["trust_remote_code"] is True

    path = write(tmp_path / "r.yaml", "teacher: default\ntask: summarize\n"
                                      "stages: {generate: {n: 1}, prune: {target: 0.5}}\n")
    recipes = {flag: load_recipe(path, trust_remote_code=flag) for flag in (False, True)}
    seen = {}
    monkeypatch.setattr("slmkit.prune.prune", lambda cfg: seen.setdefault("prune", cfg) and {})
    monkeypatch.setattr("slmkit.generate.generate", lambda cfg: seen.setdefault("generate", cfg) and {})
    monkeypatch.setattr("slmkit.backends.load_backend",
                        lambda spec, **kw: seen.setdefault("backend", kw) and None)
    for flag, recipe in recipes.items():
        ctx = pipeline.Context(recipe=recipe, run_dir=tmp_path / "run", teacher="default",
                               data="d.jsonl")
        pipeline.stage_generate(ctx, recipe.stages["generate"])
        pipeline.stage_prune(ctx, recipe.stages["prune"])
        assert seen.pop("prune").trust_remote_code is flag
        cfg = seen.pop("generate")
        assert cfg.trust_remote_code is flag
        from slmkit.generate import teacher_backend

        teacher_backend(cfg)  # the generate config reaches the model loader
        assert seen.pop("backend")["trust_remote_code"] is flag


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "ABSOLUTE", "", ".hidden", "a\\b"])
def test_recipe_name_is_one_safe_path_component(cli, tmp_path, name):
    name = str(tmp_path / "x") if name == "ABSOLUTE" else name
    path = write(tmp_path / "escape.yaml", f"name: {json.dumps(name)}\nteacher: default\n"
                                           "task: summarize\nstages: {export: {}}\n")
    with pytest.raises(UsageError) as e:
        load_recipe(path)
    assert f"{path}:1: name:" in str(e.value)
    runs = tmp_path / "deep" / "runs"
    code, _, err = cli("build", path, "--runs", runs)
    assert code == 2 and ":1: name:" in err and "Traceback" not in err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()


def test_build_refuses_an_unsafe_name_set_in_code(tmp_path):
    recipe = load_recipe(write(tmp_path / "ok.yaml", "teacher: default\ntask: summarize\n"
                                                     "stages: {export: {}}\n"))
    assert recipe.name == "ok"
    recipe.name = "../outside"
    with pytest.raises(UsageError, match="name"):
        pipeline.build(recipe, runs=tmp_path / "runs")
    assert not (tmp_path / "outside").exists()


# --------------------------------------------------------------------------- changed options

def kd_recipe(tmp_path, model, task_data, distill_opts: str):
    """A recipe with only a distill stage (student = teacher = `model`)."""
    return write(tmp_path / "kd.yaml", f"""
        name: kd
        teacher: {model}
        student: {model}
        task: summarize
        data: {task_data}
        stages:
          distill: {{{distill_opts}}}
        """)


@pytest.mark.slow
def test_killed_training_then_changed_options_restarts_the_stage(tmp_path, tiny_llama, task_data,
                                                                  monkeypatch):
    from slmkit import distill as distill_mod

    recipe_path = kd_recipe(tmp_path, tiny_llama, task_data, "max_steps: 3, batch_size: 4")
    runs = tmp_path / "runs"
    real = distill_mod.distill

    def killed_after_one_step(cfg):  # leaves student.work/checkpoint behind, like a kill
        real(dataclasses.replace(cfg, stop_after=1))
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "distill", killed_after_one_step)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(load_recipe(recipe_path), runs=runs)
    assert (runs / "kd" / "student.work" / "checkpoint").is_dir()

    # the same options resume from the checkpoint ...
    resumed = []
    monkeypatch.setattr(distill_mod, "distill", lambda cfg: resumed.append(cfg.resume) or real(cfg))
    # ... changed ones start the stage over instead of refusing the old checkpoint
    changed = write(recipe_path, recipe_path.read_text().replace("max_steps: 3", "max_steps: 4"))
    result = pipeline.build(load_recipe(changed), runs=runs)
    assert resumed == [False] and result["stages"]["distill"]["status"] == "done"
    record = json.loads((runs / "kd" / "student" / "training_record.json").read_text())
    assert record["steps"] == 4


def test_interrupted_stage_resumes_only_with_the_same_inputs(tmp_path, tiny_llama, task_data,
                                                           monkeypatch):
    recipe_path = kd_recipe(tmp_path, tiny_llama, task_data, "max_steps: 3")
    runs = tmp_path / "runs"
    calls = []

    def fake(cfg):
        calls.append(not cfg.restart)  # would continue a checkpoint it finds
        if len(calls) in (1, 2):  # killed with a checkpoint left behind
            (Path(cfg.out).parent / "student.work" / "checkpoint").mkdir(parents=True, exist_ok=True)
            raise KeyboardInterrupt
        Path(cfg.out).mkdir(exist_ok=True)
        return cfg.out

    monkeypatch.setattr("slmkit.distill.distill", fake)
    for text in ("max_steps: 3", "max_steps: 3", "max_steps: 4"):
        recipe = load_recipe(write(recipe_path, recipe_path.read_text().replace("max_steps: 3", text)))
        try:
            pipeline.build(recipe, runs=runs)
        except KeyboardInterrupt:
            pass
    assert calls[1:] == [True, False]  # resumed (same inputs), restarted (changed)


@pytest.mark.slow
def test_changed_generate_options_regenerate(tmp_path, tiny_llama, task_data):
    recipe_path = write(tmp_path / "gen.yaml", f"""
        name: gen
        teacher: {tiny_llama}
        task: summarize
        data: {task_data}
        stages:
          generate: {{max_new_tokens: 4, n: 1, limit: 4, judge: false}}
        """)
    runs = tmp_path / "runs"
    first = pipeline.build(load_recipe(recipe_path), runs=runs)["stages"]["generate"]["outputs"]
    assert first["stats"]["done_before"] == 0 and first["stats"]["inputs"] == 4
    changed = write(recipe_path, recipe_path.read_text().replace("max_new_tokens: 4",
                                                                 "max_new_tokens: 6"))
    second = pipeline.build(load_recipe(changed), runs=runs)["stages"]["generate"]["outputs"]
    assert second["stats"]["done_before"] == 0  # nothing written under the old options counts
    # the tiny model's answers are all dropped: the rejected side file holds each input once
    data = runs / "gen" / "data"
    rows = [json.loads(line) for f in data.glob("generated*.jsonl") for line in open(f)]
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows}) and len(rows) == 4


# --------------------------------------------------------------------------- the teacher labels

NAMES = ["Anna", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jill"]
TOPICS = ["report", "invoice", "slides", "budget", "contract", "trip", "party", "garden", "lease",
          "exam", "car", "menu"]


def mixed_rows(labelled=6, unlabelled=6, eval_ids=(0, 3)):
    """Distinct summarize lines: the first `labelled` have a summary, the rest none (one of them an
    empty one); `eval_ids` are marked "split": "eval" (with () no line names a split)."""
    rows = []
    for i in range(labelled + unlabelled):
        a, b, t = NAMES[i % 10], NAMES[(i + 3) % 10], TOPICS[i]
        row = {"id": f"d{i}",
               "dialogue": f"{a}: did you see the {t} yet?\n{b}: not yet, I will look at the {t} on day {i}."}
        if i < labelled:
            row["summary"] = f"{b} will look at the {t} on day {i}."
        elif i == labelled:
            row["summary"] = ""  # empty counts as missing
        if i in eval_ids:
            row["split"] = "eval"
        rows.append(row)
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_recipe(tmp_path, model, data, stages: dict, extra=""):
    """A recipe with the given stages ({stage: "opt: value, ..."}); student = teacher = `model`."""
    path = tmp_path / "lab.yaml"
    path.write_text(f"name: lab\nteacher: {model}\nstudent: {model}\ntask: summarize\n"
                    f"data: {data}\n{extra}\nstages:\n"
                    + "".join(f"  {stage}: {{{opts}}}\n" for stage, opts in stages.items()))
    return path


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_tuned_teacher_labels_the_unlabelled_lines_for_distill(tmp_path, tiny_llama, monkeypatch):
    from safetensors import safe_open

    from slmkit.backends import load_backend
    from slmkit.data import file_hash
    from slmkit.tasks import get_task

    rows = mixed_rows()
    data = write_rows(tmp_path / "data.jsonl", rows)
    recipe_path = label_recipe(tmp_path, tiny_llama, data, {
        "tune_teacher": "max_steps: 2, batch_size: 4",
        "label": "judge: false, max_new_tokens: 6",
        "distill": "max_steps: 2, batch_size: 4"})
    runs = tmp_path / "runs"
    result = pipeline.build(load_recipe(recipe_path), runs=runs)
    stages, folder = result["stages"], runs / "lab" / "data"
    assert [s for s in stages if stages[s]["status"] == "done"] == ["tune_teacher", "label", "distill"]
    tuned = stages["tune_teacher"]["outputs"]["tuned"]
    assert tuned == str(runs / "lab" / "teacher_tuned")

    # distill read the data's lines as they were, then the tuned teacher's answers, marked
    record = json.loads((runs / "lab" / "student" / "training_record.json").read_text())
    assert record["config"]["data"] == stages["label"]["outputs"]["data"] == str(folder / "combined.jsonl")
    assert record["config"]["teacher"] == tuned  # KD on every line, from the tuned teacher
    combined = read_rows(folder / "combined.jsonl")
    human, taught = combined[:6], combined[6:]
    assert human == rows[:6]
    assert [r["id"] for r in taught] == [f"d{i}" for i in range(6, 12)]
    assert stages["label"]["outputs"]["labelled"] == 6
    assert all(r["meta"]["source"] == "teacher" and r["meta"]["teacher"] == tuned
               and r["split"] == "train" and r["summary"] for r in taught)
    assert all(r["meta"]["sampling"]["n"] == 1 and r["meta"]["sampling"]["temperature"] == 0.0
               for r in taught)
    assert not any("teacher_topk" in r for r in taught)  # the cache holds it
    # the answers are the tuned teacher's greedy ones
    task = get_task("summarize")
    backend = load_backend(tuned)
    comps = backend.generate([[{"role": "user", "content": task.prompt(r)}] for r in taught],
                             max_tokens=6, temperature=0.0)
    assert [r["summary"] for r in taught] == [c.text.strip() for c in comps]

    # the top-k cache: one entry per teacher line, keyed by its text; greedy, the teacher's
    # top-1 at each of its answer tokens is that token
    from slmkit import align, topk_cache
    from slmkit.data import to_example

    cache = topk_cache.Reader(folder / "teacher.topk.safetensors")
    assert cache.teacher == tuned and cache.k == 20
    for row in read_rows(folder / "teacher.jsonl"):
        example = to_example(row, "x", task, need_answer=True)
        tokens, spans, ids, lp = cache.get(align.text_key(example), "x")
        assert ids.shape == lp.shape == (len(tokens), 20) and len(tokens) > 0
        assert ids[:, 0].tolist() == tokens.tolist() and (lp[:, 0] <= 0).all()
        assert spans[-1][1] == len(row["summary"].encode())

    # a rerun skips every stage; new unlabelled lines relabel and retrain, tune_teacher stays
    ran = []
    for stage, fn in list(pipeline.RUNNERS.items()):
        monkeypatch.setitem(pipeline.RUNNERS, stage,
                            lambda ctx, opts, fn=fn, stage=stage: ran.append(stage) or fn(ctx, opts))
    pipeline.build(load_recipe(recipe_path), runs=runs)
    assert ran == []
    write_rows(data, rows + [{"id": "new", "dialogue": "Ivo: lunch at noon?\nJill: yes, see you there."}])
    second = pipeline.build(load_recipe(recipe_path), runs=runs)
    assert ran == ["label", "distill"] and second["stages"]["label"]["outputs"]["labelled"] == 7


def test_label_stage_is_a_no_op_without_unlabelled_lines(tmp_path, tiny_llama, task_data,
                                                          monkeypatch):
    """Fully labelled data: the label stage is done without running the teacher, and distill
    reads exactly what it reads without the stage."""
    seen = []

    def fake(cfg):  # distill: note what it would train on
        seen.append((cfg.data, cfg.teacher, Path(cfg.data).read_text()))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return cfg.out

    monkeypatch.setattr("slmkit.distill.distill", fake)
    monkeypatch.setattr("slmkit.generate.generate", lambda cfg: pytest.fail("the teacher ran"))
    for name, stages in (("before", {"distill": "max_steps: 2"}),
                         ("with_label", {"label": "", "distill": "max_steps: 2"})):
        recipe = load_recipe(label_recipe(tmp_path, tiny_llama, task_data, stages))
        result = pipeline.build(recipe, runs=tmp_path / name)
    assert result["stages"]["label"]["status"] == "done"
    assert result["stages"]["label"]["outputs"] == {"data": seen[1][0], "labelled": 0}
    assert seen[0] == seen[1] == (str(task_data), str(tiny_llama), task_data.read_text())
    assert not (tmp_path / "with_label" / "lab" / "data").exists()  # nothing split, nothing written


def test_label_stage_options_are_generates(tmp_path, task_data):
    from slmkit.recipe import _stage_api

    assert set(_stage_api("label")) == set(_stage_api("generate")) and "inputs" not in _stage_api("label")
    bad = label_recipe(tmp_path, "default", task_data, {"label": "n: many"})
    with pytest.raises(UsageError, match=r"lab.yaml:8: stages.label.n: expected an integer"):
        load_recipe(bad)
    topics = load_recipe(label_recipe(tmp_path, "default", task_data, {"label": "topics: t.txt"}))
    with pytest.raises(UsageError, match="stages.label.topics: the label stage answers"):
        pipeline.build(topics, runs=tmp_path / "runs")


@pytest.mark.parametrize("held", ["marked", "held_out_rule", "eval_data"])
def test_eval_lines_are_never_labelled_into_training(tmp_path, tiny_llama, held):
    """Whichever way the eval set is given, no eval line is answered by the teacher and no
    unlabelled copy of an eval input reaches the training data."""
    from slmkit.data import held_out

    extra = ""
    if held == "marked":  # lines marked eval stay eval, even one without a summary
        rows = mixed_rows(eval_ids=(0, 3, 9))
        eval_rows = [r for r in rows if r.get("split") == "eval"]
    elif held == "held_out_rule":  # no split marks: 10 % of the *labelled* lines are held out
        rows = mixed_rows(eval_ids=())
        eval_rows = [r for r, h in zip(rows[:6], held_out(rows[:6])) if h]
    else:
        rows = mixed_rows(eval_ids=())
        eval_rows = [{"id": "e0", "dialogue": "Gus: is the bakery open on Sunday?\nHana: only until "
                                             "noon, so go early.", "summary": "The bakery closes at noon."},
                     {"id": "e1", "dialogue": "Ivo: who feeds the cat this week?\nJill: I do, you did "
                                             "it last week.", "summary": "Jill feeds the cat."}]
        extra = f"eval_data: {write_rows(tmp_path / 'eval.jsonl', eval_rows)}"
    copy = {"id": "copy", "dialogue": eval_rows[0]["dialogue"]}  # an eval input, unlabelled
    data = write_rows(tmp_path / "data.jsonl", rows + [copy])
    recipe = load_recipe(label_recipe(tmp_path, tiny_llama, data,
                                      {"label": "judge: false, max_new_tokens: 4"}, extra))
    result = pipeline.build(recipe, runs=tmp_path / "runs")
    folder = tmp_path / "runs" / "lab" / "data"
    eval_ids = {r["id"] for r in eval_rows}
    eval_dialogues = {r["dialogue"] for r in eval_rows}
    taught = [r for r in read_rows(folder / "combined.jsonl") if r.get("meta", {}).get("source")]
    expected = {f"d{i}" for i in range(6, 12)} - ({"d9"} if held == "marked" else set())
    assert {r["id"] for r in taught} == expected
    assert not eval_ids & {r["id"] for r in taught}
    assert not eval_dialogues & {r["dialogue"] for r in taught}
    rejected = read_rows(folder / "teacher.rejected.jsonl")
    assert rejected == [{"id": "copy", "reason": "contaminated_input"}]
    assert result["stages"]["label"]["outputs"]["stats"]["dropped"] == {"contaminated_input": 1}
    if held != "eval_data":  # the held-out lines reach eval and distill's own eval as eval lines
        trained = result["stages"]["label"]["outputs"]["data"]
        assert trained == str(folder / "combined.jsonl")
        assert {r["id"] for r in read_rows(trained) if r.get("split") == "eval"} == eval_ids


def test_an_api_teacher_may_label_but_not_be_tuned(tmp_path):
    """A served teacher has no weights: it may write and label data, not be tuned or pruned."""
    head = "teacher: openai:big@http://127.0.0.1:8000/v1\nstudent: s\ntask: summarize\n"
    ok = load_recipe(write(tmp_path / "ok.yaml", head + "stages: {label: {}, distill: {}}\n"))
    assert list(ok.stages) == ["label", "distill"]
    with pytest.raises(UsageError) as e:
        load_recipe(write(tmp_path / "bad.yaml", head + "stages: {label: {}, tune_teacher: {}}\n"))
    assert "bad.yaml:1:" in str(e.value) and "generate/label/distill/eval/export" in str(e.value)


def test_recipe_unlabelled_file_adds_inputs_to_label(tmp_path, tiny_llama, task_data, monkeypatch):
    """`unlabelled: FILE` lines are answered after the data's own unlabelled lines; the file is
    checked (a label stage must exist, no line may carry a target) with file:line errors."""
    rows = mixed_rows(eval_ids=(0,))
    data = write_rows(tmp_path / "data.jsonl", rows)
    more = [{"id": "m0", "dialogue": "Ben: bus or train?\nCleo: train, it is faster."},
            {"id": "m1", "dialogue": "Dan: pizza tonight?\nEva: sure, at eight."}]
    write_rows(tmp_path / "more.jsonl", more)
    seen = []

    def fake(cfg):  # generate: note what the teacher was asked to answer; answer nothing
        seen.append(read_rows(cfg.inputs))
        Path(cfg.out).write_text("")
        return {"inputs": len(seen[-1]), "dropped": {}}

    monkeypatch.setattr("slmkit.generate.generate", fake)
    recipe = load_recipe(label_recipe(tmp_path, tiny_llama, data, {"label": ""},
                                      "unlabelled: more.jsonl"))
    assert recipe.unlabelled == [str((tmp_path / "more.jsonl").resolve())]
    pipeline.build(recipe, runs=tmp_path / "runs")
    assert [r["id"] for r in seen[0]] == [f"d{i}" for i in range(6, 12)] + ["m0", "m1"]
    human = read_rows(tmp_path / "runs" / "lab" / "data" / "human.jsonl")
    assert [r["id"] for r in human] == [f"d{i}" for i in range(6)]

    # fully labelled data: the file alone is labelled
    full = write_rows(tmp_path / "full.jsonl", mixed_rows(labelled=12, unlabelled=0))
    pipeline.build(load_recipe(label_recipe(tmp_path, tiny_llama, full, {"label": ""},
                                            "unlabelled: more.jsonl")), runs=tmp_path / "runs2")
    assert [r["id"] for r in seen[1]] == ["m0", "m1"]

    with pytest.raises(UsageError, match=r"lab.yaml:6: unlabelled: .* need a `label` stage"):
        load_recipe(label_recipe(tmp_path, tiny_llama, data, {"distill": ""}, "unlabelled: more.jsonl"))
    write_rows(tmp_path / "more.jsonl", more + [{"dialogue": "Finn: done?", "summary": "Finn asks."}])
    with pytest.raises(UsageError, match=r"more.jsonl:3: has a `summary`; the `unlabelled:` file"):
        pipeline.build(load_recipe(label_recipe(tmp_path, tiny_llama, data, {"label": ""},
                                                "unlabelled: more.jsonl")), runs=tmp_path / "runs3")


def test_build_preflight_refuses_what_a_later_stage_cannot_take(tmp_path, task_data, cli):
    """An unexportable rope, an unprunable family or a quant without llama.cpp is found before
    the first stage runs: one line naming the recipe, exit 2, no stage started."""
    from conftest import make_tiny_model

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 32}
    yarn = make_tiny_model("qwen2", tmp_path / "yarn", layers=2, rope_parameters=rope)
    gemma2 = make_tiny_model("gemma2", tmp_path / "gemma2", layers=2)
    cases = [(yarn, "  export: {quant: f16}", "rope type `yarn`"),
             (gemma2, "", "does not support the gemma2 architecture")]
    for i, (teacher, extra, message) in enumerate(cases):
        recipe = tiny_recipe(tmp_path, teacher, task_data, extra=extra)
        runs = tmp_path / f"runs{i}"
        code, _, err = cli("build", recipe, "--runs", runs)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
        assert str(recipe) in err
        manifest = runs / "tiny" / "manifest.json"
        assert not manifest.exists() or not json.loads(manifest.read_text()).get("stages")
        assert not (runs / "tiny" / "teacher_tuned").exists()


def test_build_preflight_needs_llamacpp_for_k_quants(tmp_path, tiny_llama, task_data, cli,
                                                    monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    recipe = tiny_recipe(tmp_path, tiny_llama, task_data, extra="  export: {quant: q4_k_m}")
    code, _, err = cli("build", recipe, "--runs", tmp_path / "runs")
    assert code == 2 and "llama-cpp-python" in err and "stages.export" in err
    assert not (tmp_path / "runs" / "tiny" / "teacher_tuned").exists()
