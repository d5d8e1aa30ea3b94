"""slm eval on tiny random models: multiple choice equals a direct computation of summed
log-probs, perplexity's sliding window equals a slow token-by-token reference, batched generation
equals one-at-a-time generation, and the whole command writes its report. Bad input exits 2."""

import json
import math
import shutil

import pytest
import torch

from conftest import REL_TOL
from slmkit import evaluate as E
from slmkit import models, precision
from slmkit.errors import UsageError


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Only the two architectures these tests use (the shared fixture builds six)."""
    from conftest import make_tiny_model

    root = tmp_path_factory.mktemp("eval-tiny")
    return {"llama": make_tiny_model("llama", root / "llama"),
            "qwen2": make_tiny_model("qwen2", root / "qwen2", layers=2)}


@pytest.fixture(scope="module")
def tiny_llama(tiny_pair):
    return tiny_pair["llama"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return models.load_model(tiny_llama)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _direct_loglik(model, tok, context, continuation):
    """Summed log p(continuation tokens | everything before), one sequence, no batching."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad(), precision.autocast("cpu"):
        logits = model(ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_loglikelihoods_equal_direct_sum(llama, autocast_mode):
    model, tok = llama
    pairs = [("Question: what does the fox do?\nAnswer:", " jumps over the dog"),
             ("Question: when?\nAnswer:", " tomorrow morning"),
             ("Can you send me the report", " before the meeting?"),
             ("Thanks for your message! ", "I will call")]  # trailing space moves to the continuation
    got = E.loglikelihoods(model, tok, pairs, batch_size=3)
    for (c, x), g in zip(pairs, got):
        n = len(c) - len(c.rstrip(" "))
        c, x = (c[:-n], c[-n:] + x) if n else (c, x)
        assert g == pytest.approx(_direct_loglik(model, tok, c, x), abs=1e-4, rel=REL_TOL[autocast_mode])


def test_benchmark_acc_acc_norm_groups_and_fewshot(llama, tmp_path):
    model, tok = llama
    rows = [{"question": f"Which word comes {w}?", "choices": ["the cat", "a dog sleeps", "sun"],
             "gold": g, "group": grp}
            for w, g, grp in [("first", 0, "a"), ("second", 1, "a"), ("third", 2, "b"), ("last", 1, "b")]]
    bench = E.load_benchmark(_write(tmp_path / "mc.jsonl", rows), shots=1)
    res = E.run_benchmark(model, tok, bench, seed=7, batch_size=4)
    # recompute by hand from direct log-likelihoods
    acc, acc_norm, per_group = [], [], {"a": [], "b": []}
    for i, r in enumerate(rows):
        shot = E.fewshot(bench["items"], i, 1, 7)
        assert len(shot) == 1 and shot[0]["question"] != r["question"]
        ctx = E.mc_context(r, shot)
        assert ctx.startswith(f"Question: {shot[0]['question']}\nAnswer: {shot[0]['choices'][shot[0]['gold']]}")
        ll = [_direct_loglik(model, tok, ctx, " " + c) for c in r["choices"]]
        acc.append(max(range(3), key=lambda k: ll[k]) == r["gold"])
        acc_norm.append(max(range(3), key=lambda k: ll[k] / len(r["choices"][k])) == r["gold"])
        per_group[r["group"]].append(acc[-1])
    assert res["acc"] == pytest.approx(sum(acc) / 4) and res["acc_norm"] == pytest.approx(sum(acc_norm) / 4)
    assert res["groups"]["a"]["acc"] == pytest.approx(sum(per_group["a"]) / 2)
    assert res["score"] == pytest.approx((sum(per_group["a"]) / 2 + sum(per_group["b"]) / 2) / 2)
    # fixed seed: the same shots on every call; another seed may differ but stays valid
    assert E.fewshot(bench["items"], 2, 2, 7) == E.fewshot(bench["items"], 2, 2, 7)


def test_answer_extraction():
    assert E.extract_answer("3 apples and 4 more makes 7. The answer is 7.") == "7"
    assert E.extract_answer("first 12, then 1,250\nQuestion: next") == "1,250"
    assert E.answer_correct("1,250", "1250") and E.answer_correct("$7.00", 7)
    assert not E.answer_correct("8", "7")
    assert E.answer_correct("The Paris", "paris") and not E.answer_correct("Rome", "Paris")


def test_generation_benchmark_runs(llama, tmp_path):
    model, tok = llama
    rows = [{"question": f"What is {i} plus 1?", "answer": str(i + 1), "type": "gen",
             "rationale": f"{i} and one more is {i + 1}."} for i in range(3)]
    bench = E.load_benchmark(_write(tmp_path / "g.jsonl", rows), shots=1)
    assert "The answer is" in E.gen_prompt(rows[0], [rows[1]]) and E.COT in E.gen_prompt(rows[0], [])
    prompts = [E.gen_prompt(r, E.fewshot(bench["items"], i, 1, 1234)) for i, r in enumerate(rows)]
    assert E.gen_prompt(rows[0], []) == "Question: What is 0 plus 1?\nAnswer: Let's think step by step."
    # the model's own greedy continuations of the plain prompts (no chat template), one by one
    direct = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad(), precision.autocast("cpu"):
            gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        direct.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    seen = []
    real = E.generate

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "generate", spy)
        res = E.run_benchmark(model, tok, bench, max_new_tokens=4)
    assert seen == [direct]
    right = [E.answer_correct(E.extract_answer(o), r["answer"]) for o, r in zip(direct, rows)]
    assert res["kind"] == "gen" and res["n"] == 3 and res["accuracy"] == sum(right) / 3

    # the scoring, on answers of known correctness: 0 right by its last "answer is", 1 wrong,
    # 2 right by its last number (not its first), 3 wrong; groups a = {0, 1, 2}, b = {3}
    rows = [dict(r, group="a") for r in rows] + [{"question": "What is 9 plus 1?", "answer": "10",
                                                  "type": "gen", "group": "b"}]
    answers = ["so 0 + 1 = 1. The answer is 1.", "The answer is 3.", "2 and 1 make 3", "I don't know."]
    bench = E.load_benchmark(_write(tmp_path / "g2.jsonl", rows), shots=1)
    calls = []

    def scripted(model_, tok_, prompts_, max_new_tokens, **kw):
        calls.append((prompts_, max_new_tokens, kw["chat"]))
        return answers

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "generate", scripted)
        res = E.run_benchmark(model, tok, bench, seed=5, max_new_tokens=7)
    assert calls == [([E.gen_prompt(r, E.fewshot(bench["items"], i, 1, 5)) for i, r in enumerate(rows)],
                      7, False)]
    assert res["accuracy"] == 0.5
    assert res["groups"] == {"a": {"accuracy": pytest.approx(2 / 3), "n": 3}, "b": {"accuracy": 0.0, "n": 1}}
    assert res["score"] == pytest.approx((2 / 3 + 0) / 2)


def _slow_perplexity(model, ids, max_length, stride):
    """Token by token: token t is scored once, by the first window that reaches it, with that
    window's tokens before t as context."""
    n, nll, count, prev_end = ids.shape[1], 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        for t in range(max(prev_end, begin + 1), end):
            with torch.no_grad(), precision.autocast("cpu"):
                logits = model(ids[:, begin:t]).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            nll -= logp[ids[0, t]].item()
            count += 1
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count)


def test_perplexity_sliding_window(llama, autocast_mode):
    model, tok = llama
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun."
    ids = tok(text, return_tensors="pt")["input_ids"]  # 32 tokens, within the 128-token context
    with torch.no_grad(), precision.autocast("cpu"):
        logits = model(ids).logits.float()
    full = math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    tol = max(1e-4, REL_TOL[autocast_mode])
    assert E.perplexity(model, tok, text, max_length=128) == pytest.approx(full, rel=tol)
    assert E.perplexity(model, tok, text, max_length=16, stride=8) == pytest.approx(
        _slow_perplexity(model, ids, 16, 8), rel=tol)


def test_batched_left_padded_generation_equals_one_by_one(llama):
    model, tok = llama
    prompts = ["Hi", "Summarize the conversation between the two friends about their weekend plans."]
    batched = E.generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    single = [E.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and all(isinstance(s, str) for s in batched)


def test_gleu_task_scoring_uses_sources():
    from slmkit.data import Example
    from slmkit.tasks import get_task

    task = get_task("grammar")
    row = {"input": "yesterday i has a apple and a pear for lunch .",
           "references": ["yesterday i had an apple and a pear for lunch ."] * 2}
    ex = Example(prompt=task.prompt(row), references=task.references(row), row=row)
    # the model's untokenised "lunch." is split like the references' "lunch ."
    good = E.score_task("gleu", [ex], ["yesterday i had an apple and a pear for lunch."], task)
    copy = E.score_task("gleu", [ex], [row["input"]], task)
    assert good["gleu"] == pytest.approx(1.0) and copy["gleu"] < 0.5
    assert E.tokenize("I don't know, do you?") == "I do n't know , do you ?"


def test_paired_difference_for_each_kind_of_score():
    from slmkit.data import Example
    from slmkit.tasks import get_task

    grammar, qa = get_task("grammar"), get_task("qa")
    rows = [{"input": "she go to school .", "references": ["she goes to school ."]},
            {"input": "we is happy .", "references": ["we are happy ."]},
            {"input": "it rain .", "references": ["it rains ."]}]
    ex = [Example(prompt=grammar.prompt(r), references=grammar.references(r), row=r) for r in rows]
    fixed, copied = [r["references"][0] for r in rows], [r["input"] for r in rows]
    out = E.paired_difference("gleu", ex, copied, fixed, grammar)
    assert out["key"] == "gleu" and out["se"] >= 0
    assert out["diff"] == pytest.approx(E.score_task("gleu", ex, fixed, grammar)["gleu"]
                                        - E.score_task("gleu", ex, copied, grammar)["gleu"])
    assert out["diff"] > 0.3
    answers = [Example(prompt="q", references=[a], row={}) for a in ("Paris", "blue", "ten")]
    f1 = E.paired_difference("f1", answers, ["Paris", "red", "ten"], ["Paris", "blue", "ten"], qa)
    assert f1 == {"key": "f1", "diff": pytest.approx(1 / 3), "se": pytest.approx(1 / 3)}


def test_cli_end_to_end(cli, tiny_pair, tmp_path):
    data = _write(tmp_path / "d.jsonl", [
        {"dialogue": f"#Person1#: Hi {i}. #Person2#: Hello there.", "summary": "Two friends say hello."}
        for i in range(3)])
    mc = _write(tmp_path / "arc.jsonl", [{"question": f"q{i}?", "choices": ["yes", "no"], "gold": i % 2}
                                         for i in range(3)])
    out = tmp_path / "report"
    code, stdout, err = cli("eval", tiny_pair["llama"], tiny_pair["qwen2"], "--task", "summarize",
                            "--data", data, "--bench", f"{mc}:1", "--names", "teacher,student",
                            "--max-new-tokens", "4", "--out", out)
    assert code == 0, err
    assert "| teacher (reference) | student |" in stdout and "ROUGE-L" in stdout
    m = json.loads((out / "metrics.json").read_text())
    teacher, student = m["models"]
    assert teacher["name"] == "teacher" and m["reference"] == "teacher"
    assert {"rouge1", "rouge2", "rougeL"} <= set(teacher["task"]) and "agreement" in student["task"]
    paired = student["task"]["paired"]  # the student minus the teacher, example by example
    assert paired["key"] == "rougeL" and "paired" not in teacher["task"]
    assert paired["diff"] == pytest.approx(student["task"]["rougeL"] - teacher["task"]["rougeL"])
    assert "ROUGE-L minus the reference, paired" in stdout
    assert student["relative"]["cost_x"]["parameters"] == pytest.approx(
        student["parameters"] / teacher["parameters"])
    assert teacher["relative"]["cost_x"]["parameters"] == 1.0
    assert student["benchmarks"]["arc"]["shots"] == 1 and student["benchmarks"]["arc"]["n"] == 3
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert (out / "report.md").read_text().count("|") > 10
    preds = (out / "predictions" / "student.jsonl").read_text().splitlines()
    assert len(preds) == 3 and "prediction" in json.loads(preds[0])


def _bad(cli, *args):
    code, out, err = cli("eval", *args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_bad_benchmarks(cli, tiny_llama, tmp_path):
    good = {"question": "q?", "choices": ["a", "b"], "gold": 0}
    f = _write(tmp_path / "b.jsonl", [good, good | {"gold": 2}])
    assert "b.jsonl:2" in _bad(cli, tiny_llama, "--bench", f) and "out of range" in _bad(cli, tiny_llama, "--bench", f)
    f = _write(tmp_path / "c.jsonl", [good, {"question": "q?", "gold": 0}])
    assert "c.jsonl:2" in _bad(cli, tiny_llama, "--bench", f)
    f = _write(tmp_path / "g.jsonl", [{"question": "q?", "type": "gen"}])
    assert "g.jsonl:1" in _bad(cli, tiny_llama, "--bench", f)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    assert "empty" in _bad(cli, tiny_llama, "--bench", empty)
    two = _write(tmp_path / "two.jsonl", [good, good])
    assert "needs at least 3" in _bad(cli, tiny_llama, "--bench", f"{two}:2")


def test_bad_task_input(cli, tiny_llama, tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"dialogue": "hi", "summary": "s"}, {"dialogue": "hi"}])
    assert "d.jsonl:2" in _bad(cli, tiny_llama, "--task", "summarize", "--data", f)
    f = _write(tmp_path / "s.jsonl", [{"dialogue": "hi", "summary": "s", "split": "train"}])
    assert "no examples" in _bad(cli, tiny_llama, "--task", "summarize", "--data", f)
    assert "--names" in _bad(cli, tiny_llama, "--names", "a,b", "--task", "summarize", "--data", f)
    assert "nothing to measure" in _bad(cli, tiny_llama)


def test_no_chat_template(cli, tiny_llama, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    # a task's prompt runs as plain text (test_packaged); a conversation needs the template
    f = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}])
    err = _bad(cli, tiny_llama, plain, "--data", f)
    assert "d.jsonl:1" in err and "chat template" in err and str(plain) in err


def test_harness_missing_is_a_clear_error(tiny_llama):
    try:  # lm-eval is optional; only its absence is checked here
        import lm_eval  # noqa: F401
        pytest.skip("lm-evaluation-harness is installed")
    except ImportError:
        pass
    with pytest.raises(UsageError, match="pip install lm-eval"):
        E.evaluate(E.EvalConfig([str(tiny_llama)], harness="arc_easy"))


def test_speed_measured_once_per_shape(tiny_pair, tmp_path, monkeypatch):
    # a copy of a model (same shape and size, as a tuned teacher and its original) reuses the
    # first measurement; a different shape is measured itself
    from slmkit import speed as SP

    copy = tmp_path / "copy"
    shutil.copytree(tiny_pair["llama"], copy)
    (copy / "training_record.json").write_text("{}")  # as a tuned model has: not the weights
    calls = []
    monkeypatch.setattr(SP, "measure_in_subprocess",
                        lambda path, **kw: calls.append(str(path)) or {"decode_tokens_per_s": 10.0 + len(calls)})
    m = E.evaluate(E.EvalConfig([tiny_pair["llama"], str(copy), tiny_pair["qwen2"]],
                                names=["a", "b", "c"], speed=True, out=str(tmp_path / "r")))
    a, b, c = m["models"]
    assert len(calls) == 2 and calls[1] == str(models.resolve(tiny_pair["qwen2"]))
    assert b["speed"] == a["speed"] | {"measured_as": "a"} and "measured_as" not in c["speed"]
    assert "same architecture, shape and size as *a*" in (tmp_path / "r" / "report.md").read_text()


HARNESS_TASK = """task: slmkit_mc_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_multiple_choice_agrees_with_lm_evaluation_harness(tiny_llama, tmp_path, monkeypatch):
    # The same items through our scorer and through lm-evaluation-harness itself (a local task
    # file passed with --harness): the same acc and acc_norm. Skipped unless lm-eval is installed
    # (`pip install -e ".[harness]"`); it needs no network for a local task.
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [{"question": f"Which word comes after {w}?", "choices": ["a", "the cat", "quietly", "on"],
              "gold": i % 4} for i, w in enumerate(["one", "red", "sat", "the", "was", "to", "in", "it"])]
    data = _write(tmp_path / "mc.jsonl", items)
    task = tmp_path / "mc_check.yaml"
    task.write_text(HARNESS_TASK.format(data=data))
    m = E.evaluate(E.EvalConfig([str(tiny_llama)], bench=[str(data)], harness=str(task), device="cpu"))
    ours = m["models"][0]["benchmarks"]["mc"]
    theirs = m["models"][0]["harness"]["slmkit_mc_check"]
    assert ours["n"] == len(items)
    assert ours["acc"] == pytest.approx(theirs["acc,none"])
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    assert ours["acc"] != ours["acc_norm"]  # measured 0.375 and 0.25: the normalisation matters


def test_harness_task_file_errors(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="no such task file"):
        E.evaluate(E.EvalConfig([str(tiny_llama)], harness=str(tmp_path / "missing.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(UsageError, match="needs a `task: NAME` line"):
        E.evaluate(E.EvalConfig([str(tiny_llama)], harness=str(bad)))


def test_llamacpp_engine_scores_generation_of_the_gguf(tiny_llama, tmp_path):
    # the exported file generates through llama.cpp; an f32 export decodes greedily as the HF
    # model does, so task predictions and generation-benchmark answers are the same text
    pytest.importorskip("llama_cpp")
    export = pytest.importorskip("slmkit.export")
    gguf = export.export_gguf(str(tiny_llama), tmp_path / "tiny.gguf", "f32")
    data = _write(tmp_path / "d.jsonl", [{"dialogue": f"#Person1#: Hi {i}. #Person2#: Hello there {i}.",
                                          "summary": "Two friends say hello."} for i in range(3)])
    gen = _write(tmp_path / "g.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1),
                                         "type": "gen"} for i in range(3)])
    kw = dict(task="summarize", data=str(data), bench=[str(gen)], max_new_tokens=6, cot_tokens=6,
              device="cpu")
    hf = E.evaluate(E.EvalConfig([str(tiny_llama)], out=str(tmp_path / "hf"), **kw))["models"][0]
    cpp = E.evaluate(E.EvalConfig([str(gguf)], engine="llamacpp", out=str(tmp_path / "cpp"),
                                      **kw))["models"][0]
    assert cpp["engines"] == {"generation": "llamacpp", "log-likelihoods": "torch"}
    assert hf["engines"]["generation"] == "torch"
    preds = [[json.loads(line)["prediction"] for line in (tmp_path / d / "predictions" / f"{n}.jsonl").read_text().splitlines()]
             for d, n in (("hf", "llama"), ("cpp", "tiny"))]
    assert preds[0] == preds[1] and any(preds[0])
    assert cpp["task"]["rougeL"] == pytest.approx(hf["task"]["rougeL"])
    assert cpp["benchmarks"]["g"]["accuracy"] == hf["benchmarks"]["g"]["accuracy"]


def test_copy_baseline_in_the_scorecard(cli, tiny_llama, tmp_path):
    rows = [{"input": f"She go to school number {i} .", "output": f"She goes to school number {i} ."}
            for i in range(3)]
    data = _write(tmp_path / "g.jsonl", rows)
    out = tmp_path / "report"
    code, stdout, err = cli("eval", tiny_llama, "--task", "grammar", "--data", data,
                            "--max-new-tokens", "4", "--out", out)
    assert code == 0, err
    assert "copy the input (baseline)" in stdout
    m = json.loads((out / "metrics.json").read_text())
    from slmkit.data import load_examples
    from slmkit.tasks import get_task

    task = get_task("grammar")
    ex = load_examples(data, task, need_answer=True)
    assert m["baselines"][0]["task"] == E.score_task("gleu", ex, [r["input"] for r in rows], task)


def test_qa_scores_unanswerable_apart():
    from slmkit.data import Example

    ex = [Example(references=["The passage does not say."]), Example(references=["Two tablets."])]
    s = E.score_task("f1", ex, ["The passage does not say.", "Two tablets."])
    assert s["unanswerable_acc"] == 1.0 and s["f1_answerable"] == 1.0 and s["n_unanswerable"] == 1
    s = E.score_task("f1", ex, ["Take two tablets.", "The passage does not say."])
    assert s["unanswerable_acc"] == 0.0 and s["f1_answerable"] == 0.0
