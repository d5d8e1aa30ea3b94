"""A big teacher's road: dev sets cut into parts (eval_part), several unlabelled files, a GGUF
teacher whose top-k the label stage writes for distill (captured while it answers, plus the
human lines scored), and the learning-rate rule and divergence warning of slm distill."""

import json
from pathlib import Path

import pytest

from slmkit import pipeline, topk_cache
from slmkit.data import DEV_PARTS, dev_part
from slmkit.errors import UsageError
from slmkit.recipe import load_recipe


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def dialogues(n, labelled=True):
    names = ["Ann", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hal"]
    rows = []
    for i in range(n):
        a, b = names[i % 8], names[(i * 3 + 1) % 8]
        row = {"id": f"d{i}", "dialogue": f"{a}: shall we meet on day {i}?\n{b}: yes, at {i % 12} o'clock."}
        if labelled:
            row["summary"] = f"{a} and {b} meet on day {i} at {i % 12}."
        rows.append(row)
    return rows


def test_dev_part_is_stable_and_cuts_quarters():
    prompts = [f"sentence number {i} with an eror" for i in range(4000)]
    parts = [dev_part(p) for p in prompts]
    assert parts == [dev_part(p) for p in prompts]  # same text, same part, on every call
    assert set(parts) == {"train", "validation", "test"}
    for part, share in DEV_PARTS.items():
        assert abs(parts.count(part) / len(parts) - share) < 0.03
    # the part is the line's own: shuffling or dropping other lines moves nothing
    assert [dev_part(p) for p in reversed(prompts[:50])] == list(reversed(parts[:50]))


def recipe_text(data, extra="", stages="  label: {}\n  distill: {max_steps: 1}\n"):
    return (f"name: dev\nteacher: default\nstudent: default\ntask: summarize\ndata: {data}\n"
            f"{extra}stages:\n{stages}")


def test_eval_part_is_checked_with_file_and_line(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", dialogues(8))
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_text(data, "eval_part: dev\n"))
    with pytest.raises(UsageError, match=r"bad.yaml:6: eval_part: 'dev' is not one of validation, test"):
        load_recipe(bad)
    preset = tmp_path / "preset.yaml"
    preset.write_text(recipe_text("preset", "eval_part: test\n"))
    with pytest.raises(UsageError, match=r"preset.yaml:6: eval_part: needs a dev set"):
        load_recipe(preset)
    listed = tmp_path / "listed.yaml"
    more = write_rows(tmp_path / "more.jsonl", dialogues(3, labelled=False))
    listed.write_text(recipe_text(data, f"unlabelled:\n  - {more}\n  - {tmp_path / 'none.jsonl'}\n"))
    with pytest.raises(UsageError, match=r"listed.yaml:6: unlabelled: file .*none.jsonl. does not exist"):
        load_recipe(listed)


def test_split_dev_trains_on_no_scored_line(tmp_path):
    """The dev set is the data: only its train part is trained on; both scored parts are written
    (validation.jsonl, test.jsonl) and kept out (heldout.jsonl)."""
    rows = dialogues(80)
    data = write_rows(tmp_path / "dev.jsonl", rows)
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(data, "eval_part: validation\n"))
    recipe = load_recipe(path)
    train, more, parts = pipeline.split_dev(recipe, str(data), tmp_path / "out")
    ids = {part: {r["id"] for r in read_rows(p)} for part, p in parts.items()}
    trained = {r["id"] for r in read_rows(train)}
    assert trained and ids["validation"] and ids["test"] and more is None
    assert not trained & ids["heldout"] and ids["heldout"] == ids["validation"] | ids["test"]
    assert trained | ids["heldout"] == {r["id"] for r in rows}
    assert all(dev_part(recipe.task.prompt(r)) == "test" for r in read_rows(parts["test"]))


def test_split_dev_turns_the_dev_sets_train_part_into_inputs(tmp_path):
    """eval_data is also an `unlabelled:` file: its train part's inputs, references dropped, go
    to the teacher; the other unlabelled file is read as it is."""
    dev = write_rows(tmp_path / "dev.jsonl", dialogues(60))
    extra = write_rows(tmp_path / "extra.jsonl", dialogues(2, labelled=False))
    human = write_rows(tmp_path / "human.jsonl", dialogues(4))
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(human, f"eval_data: {dev}\neval_part: test\n"
                                       f"unlabelled: [{extra}, {dev}]\n"))
    recipe = load_recipe(path)
    data, more, parts = pipeline.split_dev(recipe, recipe.data, tmp_path / "out")
    assert data == recipe.data  # the human lines are another file: all trained on
    assert more[0] == str(extra)
    inputs = read_rows(more[1])
    assert inputs and all(set(r) == {"dialogue"} for r in inputs)
    held = {r["dialogue"] for r in read_rows(parts["heldout"])}
    assert not held & {r["dialogue"] for r in inputs}
    assert len(inputs) + len(held) == 60
    # the label stage reads both files, in order
    _, unlabelled = pipeline.split_unlabelled(data, recipe.task, tmp_path / "out", more)
    assert len(read_rows(unlabelled)) == 2 + len(inputs)


def small_cache(path, vocab, keys, k=3):
    w = topk_cache.Writer(k, "t", "test", vocab, stops=[0])
    for key in keys:
        w.add(key, [1, 2], [(0, 1), (1, 2)], [[1, 2, 0], [2, 1, 0]], [[-0.1, -2.0, -5.0]] * 2)
    return w.save(path)


def test_merge_joins_caches_of_one_teacher(tmp_path):
    vocab = [b"<e>", b"a", b"b"]
    a = small_cache(tmp_path / "a.safetensors", vocab, ["x", "y"])
    b = small_cache(tmp_path / "b.safetensors", vocab, ["y", "z"])
    merged = topk_cache.Reader(topk_cache.merge([a, b], tmp_path / "m.safetensors"))
    keys = {k.rsplit(".", 1)[0] for k in merged.file.keys() if not k.startswith("vocab.")}
    assert keys == {"x", "y", "z"} and merged.vocab == vocab and merged.stops == [0]
    tokens, spans, ids, lp = merged.get("z", "here")
    assert tokens.tolist() == [1, 2] and spans == [(0, 1), (1, 2)]
    other = small_cache(tmp_path / "c.safetensors", [b"<e>", b"a", b"c"], ["w"])
    with pytest.raises(UsageError, match="different teachers"):
        topk_cache.merge([a, other], tmp_path / "bad.safetensors")


@pytest.mark.slow
def test_gguf_teacher_labels_and_teaches_distill_from_its_top_k(tmp_path, tiny_llama, monkeypatch):
    """A .gguf teacher answers the unlabelled lines (PyTorch engine, batched) keeping its top-k,
    scores the human lines too, and distill reads the one merged file: every line it trains on is
    in it, and no teacher model is given to distill. The GGUF is not exported again."""
    from slmkit import align
    from slmkit.data import to_example
    from slmkit.export import export_gguf

    gguf = export_gguf(str(tiny_llama), tmp_path / "teacher.gguf", "f32")
    rows = dialogues(6) + dialogues(10, labelled=False)[6:]
    data = write_rows(tmp_path / "data.jsonl", rows)
    bench = write_rows(tmp_path / "mc.jsonl", [{"question": f"Which comes {w}?", "gold": g,
                                                "choices": ["the cat", "a dog sleeps", "sun"]}
                                               for w, g in [("first", 0), ("next", 1), ("last", 2)]])
    path = tmp_path / "r.yaml"
    path.write_text(f"name: big\nteacher: {gguf}\nstudent: {tiny_llama}\ntask: summarize\n"
                    f"data: {data}\nstages:\n"
                    "  label: {engine: torch, max_new_tokens: 6, judge: false, batch_size: 4}\n"
                    "  distill: {max_steps: 2, alpha_ce: 0.5, max_length: 128}\n"
                    "  export: {quant: q8_0}\n"
                    f"  eval: {{engine: torch, max_new_tokens: 4, limit: 2, bench: [{bench}]}}\n")
    seen = []
    real = pipeline._train

    def spy(ctx, opts, **kw):
        seen.append(kw)
        return real(ctx, opts, **kw)

    monkeypatch.setattr(pipeline, "_train", spy)
    result = pipeline.build(load_recipe(path), runs=tmp_path / "runs")
    label = result["stages"]["label"]["outputs"]
    assert label["labelled"] == 4
    assert seen[0]["teacher"] is None and seen[0]["teacher_cache"] == label["teacher_cache"]
    reader = topk_cache.Reader(label["teacher_cache"])
    from slmkit.tasks import get_task

    task = get_task("summarize")
    for n, row in enumerate(read_rows(label["data"]), 1):
        key = align.text_key(to_example(row, f"combined:{n}", task, need_answer=True))
        tokens, _, _, lp = reader.get(key, f"combined:{n}")
        assert len(tokens) and bool((lp > float("-inf")).any())
    # the teacher's file is scored as it is, never exported again; the scorecard prices both files
    assert "teacher_gguf" not in result["stages"]["export"]["outputs"]
    card = json.loads((Path(result["final"]["report"]) / "scorecard.json").read_text())
    rows = {r["name"]: r for r in card["rows"]}
    assert card["teacher"] == "teacher (zero-shot)" and card["student"] == "student q8_0 (torch)"
    for name in (card["teacher"], card["student"]):
        assert rows[name]["decode_tokens_per_s"] > 0 and rows[name]["bytes_on_disk"] > 0
    assert rows[card["teacher"]]["bytes_on_disk"] == gguf.stat().st_size
    assert card["headline"].startswith("student: ") and "of its file size" in card["headline"]
    # outside its job: the benchmark the eval stage was given, for the teacher and the student
    assert set(card["outside_change"]) == {"mc"} and "outside its job mc " in card["headline"]
    assert all("mc" in rows[name]["outside"] for name in (card["teacher"], card["student"]))


def test_a_tuned_gguf_teacher_is_not_exported_again(tmp_path, tiny_llama):
    """Tuned, a GGUF teacher is scored in PyTorch (`teacher (tuned)`) and as its own file; only
    the student is exported (a tuned teacher's low-bit export lost its update)."""
    from slmkit.export import export_gguf

    gguf = export_gguf(str(tiny_llama), tmp_path / "teacher.gguf", "f32")
    data = write_rows(tmp_path / "data.jsonl", dialogues(8))
    path = tmp_path / "r.yaml"
    path.write_text(f"name: tuned\nteacher: {gguf}\nstudent: {tiny_llama}\ntask: summarize\n"
                    f"data: {data}\nstages:\n"
                    "  tune_teacher: {max_steps: 1, batch_size: 2, max_length: 128}\n"
                    "  distill: {max_steps: 1, batch_size: 2, max_length: 128}\n"
                    "  export: {quant: q8_0}\n")
    result = pipeline.build(load_recipe(path), runs=tmp_path / "runs")
    assert result["stages"]["tune_teacher"]["status"] == "done"
    assert set(result["stages"]["export"]["outputs"]) == {"gguf"}


def test_engine_auto_takes_torch_where_the_forward_runs_in_bf16(monkeypatch, tmp_path):
    """`engine: auto` is PyTorch where bf16 autocast applies (the rule slmkit.precision follows;
    SLMKIT_AUTOCAST stands in for the CPU here), llama.cpp elsewhere; a build keys the stage by
    the engine picked, so `auto` and the engine it picks are the same stage."""
    from slmkit import models
    from slmkit.generate import GenerateConfig

    pytest.importorskip("llama_cpp")
    assert models.pick_engine("torch") == "torch" and models.pick_engine("llamacpp") == "llamacpp"
    monkeypatch.setenv("SLMKIT_AUTOCAST", "bf16")
    assert models.pick_engine("auto", "cpu") == "torch"
    assert GenerateConfig(teacher="default", task="grammar", out="x.jsonl", engine="auto").engine == "torch"
    monkeypatch.setenv("SLMKIT_AUTOCAST", "off")
    assert models.pick_engine("auto", "cpu") == "llamacpp"

    def keys(engine):
        runs = tmp_path / engine
        recipe = write_rows(tmp_path / "d.jsonl", dialogues(8))
        path = tmp_path / f"{engine}.yaml"
        path.write_text(f"teacher: default\ntask: summarize\ndata: {recipe}\n"
                        f"stages:\n  eval: {{engine: {engine}, limit: 1, max_new_tokens: 2}}\n")
        monkeypatch.setattr(pipeline, "RUNNERS", {"eval": lambda ctx, opts: {}})
        return pipeline.build(load_recipe(path), runs=runs)["stages"]["eval"]["key"]

    assert keys("auto") == keys("llamacpp") != keys("torch")


def test_lr_rule_by_size_and_divergence_test():
    from slmkit.distill import LR_BY_SIZE, diverging, lr_for

    assert lr_for(135_000_000) == 1e-4 and lr_for(494_000_000) == 1e-5 and lr_for(1_540_000_000) == 5e-6
    assert lr_for(1_540_000_000, lora=True) == 2e-4
    assert [lr for _, lr in LR_BY_SIZE] == sorted((lr for _, lr in LR_BY_SIZE), reverse=True)
    start = {"eval_kd": 0.154, "eval_ce": 2.0}
    assert diverging(start, {"eval_kd": 0.2, "eval_ce": 2.1}) is None  # noise
    assert "0.154" in diverging(start, {"eval_kd": 1.648, "eval_ce": 2.0})  # the 0.5B at 1e-4
    assert diverging({"eval_ce": 2.0}, {"eval_ce": 5.0}).startswith("held-out CE rose")
    assert "nan" in diverging(start, {"eval_kd": float("nan")})
    assert diverging({}, {"eval_ce": 9.0}) is None  # nothing to compare with


@pytest.mark.slow
def test_distill_warns_when_training_diverges(tmp_path, tiny_llama, cli):
    """A learning rate far too large for the student: the run finishes, and says so, with the
    size rule's lr; the default lr is the rule's and is said."""
    data = write_rows(tmp_path / "d.jsonl", dialogues(12))
    code, _, err = cli("distill", "--student", tiny_llama, "--teacher", tiny_llama, "--data", data,
                       "--task", "summarize", "--out", tmp_path / "s", "--max-steps", "4",
                       "--batch-size", "2", "--eval-every", "2", "--lr", "3", "--warmup-ratio", "0")
    assert code == 0 and "warning: training is diverging at step" in err and "--lr 0.3" in err
    code, _, err = cli("distill", "--student", tiny_llama, "--data", data, "--task", "summarize",
                       "--alpha-ce", "1", "--out", tmp_path / "t", "--max-steps", "1", "--batch-size", "2")
    assert code == 0 and "--lr 0.0001, the default for a student of" in err and "diverging" not in err


def test_scorecard_says_share_size_and_speed():
    from slmkit import scorecard

    metrics = {"metric": "gleu", "headline": "task.gleu", "n_examples": 190,
               "models": [{"name": "teacher (zero-shot)", "task": {"gleu": 0.54}},
                          {"name": "student", "task": {"gleu": 0.52}},
                          {"name": "student q8_0 (llama.cpp)", "task": {"gleu": 0.513}}],
               "baselines": [{"name": "copy the input", "task": {"gleu": 0.37}}]}
    costs = {"teacher (zero-shot)": {"bytes_on_disk": 986 * 2**20, "decode_tokens_per_s": 6.0,
                                     "peak_rss_bytes": 2**31, "latency_p50_s": 12.0, "threads": 1,
                                     "prompt_tokens": 128, "new_tokens": 64},
             "student q8_0 (llama.cpp)": {"bytes_on_disk": 145 * 2**20, "decode_tokens_per_s": 36.0,
                                          "peak_rss_bytes": 2**28, "latency_p50_s": 2.0}}
    card = scorecard.build(metrics, "teacher (zero-shot)", "student q8_0 (llama.cpp)", costs)
    assert card["headline"] == ("student: 95 % of the teacher's GLEU at 1/6.8 of its file size "
                                "and 6.0x its decode speed")
    md = scorecard.markdown(card)
    assert "| copy the input | 37.0 |" in md and "| student | 52.0 | - |" in md
    assert "| teacher (zero-shot) | 54.0 | 0.96 | 2.00 | 6.0 |" in md
    assert "outside its job" not in card["headline"] and card["outside_change"] == {}


def test_scorecard_says_what_the_student_gave_up_outside_its_job():
    """Benchmarks and the safety score (over the groups both rows keep) beside the task, for the
    teacher and the student, and the student's change in points in the headline."""
    from slmkit import scorecard

    def row(name, gleu, arc, groups):
        return {"name": name, "task": {"gleu": gleu},
                "benchmarks": {"arc_easy": {"score": arc, "shots": 0}, "piqa": {"score": 0.6, "shots": 0}},
                "benchmark_average": (arc + 0.6) / 2,  # as slm eval writes it
                "safety": {"score": sum(groups.values()) / len(groups), "groups": groups}}

    metrics = {"metric": "gleu", "headline": "task.gleu", "n_examples": 10,
               "models": [row("teacher (zero-shot)", 0.54, 0.70, {"a": 0.8, "b": 0.6, "c": 0.9}),
                          row("student q8_0 (llama.cpp)", 0.50, 0.45, {"a": 0.7, "b": 0.5})],
               "baselines": [{"name": "copy the input", "task": {"gleu": 0.37}}]}
    card = scorecard.build(metrics, "teacher (zero-shot)", "student q8_0 (llama.cpp)", {})
    change = card["outside_change"]
    assert change["arc_easy"] == pytest.approx(-25.0) and change["piqa"] == pytest.approx(0.0)
    assert change["average"] == pytest.approx(-12.5)  # (70 + 60) / 2 -> (45 + 60) / 2
    assert change["safety"] == pytest.approx(-10.0)  # groups a and b only: 70 -> 60, not 76.7 -> 60
    assert card["headline"].endswith("; outside its job average -12.5, safety -10.0")
    md = scorecard.markdown(card)
    assert "| model | GLEU | arc_easy | piqa | average | safety | file GiB |" in md
    assert "| teacher (zero-shot) | 54.0 | 70.0 | 60.0 | 65.0 | 70.0 | - |" in md
    assert "| copy the input | 37.0 | - | - | - | - |" in md and "ToxiGen method" in md


@pytest.mark.slow
def test_lora_trains_adapters_and_saves_a_plain_merged_model(tmp_path, tiny_llama, cli):
    """--lora: only the adapters train (the optimizer state is tiny), the saved model is a plain
    checkpoint of the original shapes whose weights moved, and a killed run resumes."""
    pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file

    data = write_rows(tmp_path / "d.jsonl", dialogues(12))
    args = ("distill", "--student", tiny_llama, "--data", data, "--task", "summarize",
            "--alpha-ce", "1", "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2",
            "--lora", "4", "--save-every", "2")
    code, _, err = cli(*args, "--out", tmp_path / "s", "--stop-after", "2")
    assert code == 0, err
    code, _, err = cli(*args, "--out", tmp_path / "s", "--resume")
    assert code == 0, err
    before = load_file(str(Path(tiny_llama) / "model.safetensors"))
    after = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert set(after) == set(before) and not any("lora" in k for k in after)
    moved = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
    assert moved and all("proj" in k for k in moved)  # the blocks' linear layers, no embedding
    record = json.loads((tmp_path / "s" / "training_record.json").read_text())
    assert record["steps"] == 4 and record["config"]["lora"] == 4
    code, _, err = cli(*args[:-4], "--lora", "4", "--fsdp", "--out", tmp_path / "x")
    assert code == 2 and "--lora trains adapters only" in err
