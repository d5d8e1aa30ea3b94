"""`slm distill` on tiny random models: it learns, resumes exactly, scales to 2 processes, and
rejects bad input with one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import AUTOCAST_MODES, CORPUS, REL_TOL, make_tiny_model, path_tol
from slmkit import losses, models, precision
from slmkit.distill import (DistillConfig, cache_teacher, distill, encode_all, sample_answers,
                            split_rows, teacher_dtype)
from slmkit.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer teacher, a 2-layer student (same tokenizer) and 24 train + 4 eval pairs."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make_tiny_model("llama", root / "teacher", seed=0)
    student = make_tiny_model("llama", root / "student", layers=2, seed=1)
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(28):
            row = {"input": CORPUS[i % 10], "output": CORPUS[(3 * i + 1) % 10]}
            f.write(json.dumps(row | ({"split": "eval"} if i >= 24 else {})) + "\n")
    return root, teacher, student, data


def _cfg(setup, out, **kw) -> DistillConfig:
    root, teacher, student, data = setup
    base = dict(student=str(student), teacher=str(teacher), data=str(data), out=str(root / out),
                max_steps=8, batch_size=4, lr=3e-3, eval_every=4, save_every=100, device="cpu")
    return DistillConfig(**(base | kw))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_distill_changes_params_and_heldout_kd_falls(setup):
    out = distill(_cfg(setup, "kd"))
    before, after = _weights(setup[2]), _weights(out)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert len(changed) == len(after)  # every tensor learned something
    evals = [m for m in _metrics(out) if "eval_kd" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 8
    assert evals[-1]["eval_kd"] < 0.9 * evals[0]["eval_kd"]
    record = json.loads((out / "training_record.json").read_text())
    assert record["steps"] == 8 and record["tokens"] > 0 and record["final_eval"]["eval_kd"] > 0
    assert not out.with_name("kd.work").exists()  # working files cleaned up once done


@pytest.mark.parametrize("what", ["embeddings", "attention"])
def test_freeze_keeps_those_weights_and_trains_the_rest(setup, what):
    out = distill(_cfg(setup, f"freeze_{what}", max_steps=3, freeze=what))
    before, after = _weights(setup[2]), _weights(out)
    kept = {k for k in after if torch.equal(before[k], after[k])}
    expect = {k for k in after if "embed_tokens" in k or "lm_head" in k
              or (what == "attention" and ".self_attn." in k)}
    assert expect and kept == expect  # exactly those: the MLPs and norms still learn


def test_ce_only_needs_no_teacher(setup):
    out = distill(_cfg(setup, "ce", teacher=None, alpha_ce=1.0))
    evals = [m for m in _metrics(out) if "eval_ce" in m]
    assert "eval_kd" not in evals[-1]
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]
    assert evals[-1]["eval_ppl"] == pytest.approx(2.718281828 ** evals[-1]["eval_ce"], rel=1e-6)


def test_killed_and_resumed_equals_uninterrupted(setup):
    kw = dict(max_steps=6, grad_accum=2, batch_size=2, save_every=100)
    full = distill(_cfg(setup, "full", **kw))
    ckpt = distill(_cfg(setup, "resumed", stop_after=3, **kw))
    assert (ckpt / "trainer_state.json").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    resumed = distill(_cfg(setup, "resumed", resume=True, **kw))
    a, b = _weights(full), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    losses_full = [m["loss"] for m in _metrics(full) if "loss" in m]
    losses_res = [m["loss"] for m in _metrics(resumed) if "loss" in m]
    assert losses_res == pytest.approx(losses_full, rel=1e-6)  # one line per step, none duplicated


class _Planted:
    """Unpickling this writes a marker file: stands in for a hostile checkpoint's code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_checkpoints_are_safetensors_and_json_and_never_unpickled(setup, tmp_path):
    import pickle

    kw = dict(max_steps=4, save_every=100)
    ckpt = distill(_cfg(setup, "safe-ckpt", stop_after=2, **kw))
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    marker = tmp_path / "marker"
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scheduler.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Planted(marker)))  # accelerate's file names
    distill(_cfg(setup, "safe-ckpt", resume=True, **kw))
    assert not marker.exists()


def test_rerunning_an_interrupted_command_continues_it(setup, capsys):
    # the advice printed on Ctrl-C is "rerun the same command": that must continue, not restart;
    # a kill mid-save and a half-written metrics line must not lose the checkpoint either
    kw = dict(max_steps=6, grad_accum=2, batch_size=2, save_every=2)
    full = distill(_cfg(setup, "whole", **kw))
    ckpt = distill(_cfg(setup, "again", stop_after=4, **kw))
    work = ckpt.parent
    os.replace(ckpt, work / ".checkpoint.old-99")  # killed between the two renames of a save
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tok')  # killed mid-line
    again = distill(_cfg(setup, "again", **kw))
    assert "continuing from step 4" in capsys.readouterr().err
    a, b = _weights(full), _weights(again)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [m["step"] for m in _metrics(again)] == [0, 1, 2, 3, 4, 5, 6]


def test_restart_starts_over_and_other_settings_replace_the_checkpoint(setup, capsys):
    distill(_cfg(setup, "over", stop_after=2, max_steps=4))
    out = distill(_cfg(setup, "over", max_steps=4, restart=True))
    assert "continuing" not in capsys.readouterr().err
    assert [m["step"] for m in _metrics(out)] == [0, 1, 2, 3, 4]
    distill(_cfg(setup, "over2", stop_after=2, max_steps=4))
    distill(_cfg(setup, "over2", max_steps=4, lr=1e-3))
    err = capsys.readouterr().err
    assert "other settings (lr)" in err and "starting over" in err


def test_offline_topk_cache(setup, autocast_mode):
    # under bf16 autocast the cache's float16 log-probs once met bf16 inside the region: a crash
    root = setup[0]
    cache = cache_teacher(_cfg(setup, "cache-run"), root / f"topk-{autocast_mode}.safetensors", k=8)
    out = distill(_cfg(setup, f"offline-{autocast_mode}", teacher=None, teacher_cache=str(cache)))
    evals = [m for m in _metrics(out) if "eval_kd" in m]
    assert evals[-1]["eval_kd"] < evals[0]["eval_kd"]
    tensors = load_file(str(cache))
    key = next(k for k in tensors if k.endswith(".ids"))
    assert tensors[key].dtype == torch.int32 and tensors[key].shape[1] == 8
    assert tensors[key.replace(".ids", ".logprobs")].dtype == torch.float16


def test_on_policy_samples_and_trains(setup, autocast_mode):
    out = distill(_cfg(setup, f"onpolicy-{autocast_mode}", on_policy=1.0, max_steps=2, max_new_tokens=8))
    rows = [m for m in _metrics(out) if "loss" in m]
    assert len(rows) == 2 and all(r["kd"] > 0 and r["on_policy"] for r in rows)
    before, after = _weights(setup[2]), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_on_policy_batches_train_the_divergence_only(setup):
    # CE on the student's own samples would reinforce whatever it sampled (GKD trains KD there)
    out = distill(_cfg(setup, "onpolicy-kd", on_policy=1.0, alpha_ce=0.5, max_steps=1,
                       max_new_tokens=8, lr=0.0))
    row = next(r for r in _metrics(out) if r["step"] == 1)
    assert row["ce"] > 0 and row["loss"] == pytest.approx(0.5 * row["kd"], rel=1e-6)
    with pytest.raises(UsageError, match="--alpha-ce below 1"):
        _cfg(setup, "x", on_policy=0.5, alpha_ce=1.0)


def test_sampled_answers_stop_at_generation_config_eos(setup):
    root, _, student, data = setup
    model, tok = models.load_model(student)
    other_eos = 7  # a second stop token, as instruct models list in generation_config.json
    model.generation_config.eos_token_id = [tok.eos_token_id, other_eos]
    items = encode_all(split_rows(str(data), None, 0.05, 200)[0][:2], tok, 1024)
    seen = {}

    def fake_generate(input_ids, eos_token_id, **kw):
        seen["eos"] = eos_token_id
        return torch.cat([input_ids, torch.tensor([[5, other_eos, 9, 9]] * len(input_ids))], 1)

    model.generate = fake_generate
    new = sample_answers(model, items, tok, 4, torch.device("cpu"), precision.autocast("cpu"))
    assert sorted(seen["eos"]) == sorted({tok.eos_token_id, other_eos})
    for old, e in zip(items, new):
        prompt = old.ids[:old.mask.index(1)]
        assert e.ids == prompt + [5, other_eos] and e.mask == [0] * len(prompt) + [1, 1]


# --------------------------------------------------------------------------- padded batches

@pytest.fixture(scope="module")
def plain_text(setup):
    """Plain-text rows ({"text"}: every token counts, the first included) of lengths 3 to ~80
    tokens, so one batch has rows with much left padding; the last 2 lines held out."""
    path = setup[0] / "plain.jsonl"
    rows = [{"text": " ".join(CORPUS[(i + j) % 10] for j in range(1 + i % 4))[:12 + 31 * i]}
            for i in range(12)]
    path.write_text("".join(json.dumps(r | ({"split": "eval"} if i >= 10 else {})) + "\n"
                            for i, r in enumerate(rows)))
    return path


def test_cache_rows_equal_the_teachers_unbatched_predictions(setup, plain_text, autocast_mode,
                                                            tmp_path):
    # before: the pad column left of each shorter row counted as predicting its first token,
    # so every later row of a batch read a shifted slice (~5 % of top-1 ids right)
    root, teacher, _, _ = setup
    cfg = DistillConfig(student=str(teacher), teacher=str(teacher), data=str(plain_text),
                        out=str(tmp_path / "x"), batch_size=6, device="cpu")
    cache = load_file(str(cache_teacher(cfg, tmp_path / "topk.safetensors", k=4)))
    model, _ = models.load_model(teacher, dtype=teacher_dtype(cfg, torch.device("cpu")))
    keys = [k[:-len(".tokens")] for k in cache if k.endswith(".tokens")]
    assert len(keys) == 12
    for key in keys:
        ids = cache[f"{key}.tokens"].long()[None]
        with torch.no_grad(), precision.autocast("cpu"):
            logits = model(ids).logits
        ref = logits[0, :-1].float().log_softmax(-1)  # every position but the last predicts
        # a row per token of the text (the cache is keyed by text): the first has no prediction
        assert torch.isinf(cache[f"{key}.logprobs"][0]).all()
        top = cache[f"{key}.ids"].long()[1:]
        assert top.shape == (ids.shape[1] - 1, 4)
        agree = (top[:, 0] == ref.argmax(-1)).float().mean().item()
        if autocast_mode == "off":
            assert agree == 1.0, key
            torch.testing.assert_close(cache[f"{key}.logprobs"][1:].float(), ref.gather(-1, top),
                                       rtol=2e-3, atol=2e-3)  # float16 storage
        else:
            assert agree >= 0.9, (key, agree)


def test_online_loss_is_the_sum_of_unpadded_rows(setup, plain_text, autocast_mode, tmp_path):
    # lr 0 and one batch of all 10 training rows: the logged KD and CE of step 1 are the
    # untouched student's, which one unpadded forward per row gives directly
    root, teacher, student, _ = setup
    out = distill(DistillConfig(student=str(student), teacher=str(teacher), data=str(plain_text),
                                out=str(tmp_path / "s"), lr=0.0, max_steps=1, batch_size=10,
                                alpha_ce=0.5, eval_every=100, device="cpu"))
    row = next(r for r in _metrics(out) if r["step"] == 1)
    s_model, tok = models.load_model(student)
    t_model, _ = models.load_model(teacher)
    train, _ = split_rows(str(plain_text), None, 0.05, 200)
    kd = ce = n = 0.0
    for e in encode_all(train, tok, 1024):
        x = torch.tensor([e.ids])
        with torch.no_grad(), precision.autocast("cpu"):
            s, t = s_model(x).logits[0, :-1], t_model(x).logits[0, :-1]
        kd += float(losses.dense_kd(s, t).sum())
        ce += float(losses.token_ce(s, x[0, 1:]).sum())
        n += len(e.ids) - 1
    assert row["kd"] == pytest.approx(kd / n, rel=REL_TOL[autocast_mode])
    assert row["ce"] == pytest.approx(ce / n, rel=REL_TOL[autocast_mode])


def test_resume_in_another_precision_is_refused(setup, monkeypatch):
    monkeypatch.setenv("SLMKIT_AUTOCAST", "off")
    distill(_cfg(setup, "precision-run", stop_after=1, max_steps=3))
    monkeypatch.setenv("SLMKIT_AUTOCAST", "bf16")
    with pytest.raises(UsageError, match="autocast"):
        distill(_cfg(setup, "precision-run", resume=True, max_steps=3))


def _args(setup, out, *extra):
    root, teacher, student, data = setup
    return ["distill", "--student", student, "--teacher", teacher, "--data", data,
            "--out", root / out, "--max-steps", 2, "--batch-size", 4, "--device", "cpu", *extra]


def test_vocabularies_same_tokenizer_padded_or_not(setup, cli, tmp_path, monkeypatch):
    """The same tokenizer with a teacher whose config pads the vocabulary further (Qwen2.5-7B's
    152,064 logits against 0.5B's 151,936) distils: the teacher's padding rows are cut. Another
    tokenizer, or a teacher with fewer logits than the student, is refused from the tokenizers
    and configs, before any weights load."""
    import transformers as tf

    from conftest import make_sp_tokenizer, make_tokenizer
    from slmkit import models

    def teacher_with(tok, vocab_size, name):
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        return tmp_path / name

    tok = make_tokenizer()
    args = _args(setup, "padded")
    args[args.index("--teacher") + 1] = teacher_with(tok, len(tok) + 50, "padded")
    code, _, err = cli(*args)
    assert code == 0, err
    assert models.shared_vocab(setup[2], tmp_path / "padded") == len(tok)

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the vocabularies were checked")

    monkeypatch.setattr(models, "load_model", no_weights)
    sp = make_sp_tokenizer()
    for teacher, message in ((teacher_with(sp, len(sp), "other"), "different tokenizers"),
                             (teacher_with(tok, len(tok) - 1, "short"), "at least the student's")):
        # another tokenizer is the text path's (test_cross_tokenizer) unless it is switched off
        args = _args(setup, "bad") + ["--cross-tokenizer", "off"]
        args[args.index("--teacher") + 1] = teacher
        code, _, err = cli(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_no_answer_tokens_names_the_line(setup, cli, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"input": "hello", "output": "hi"}) + "\n"
                    + json.dumps({"text": "."}) + "\n")  # one token: nothing to predict
    args = _args(setup, "bad2")
    args[args.index("--data") + 1] = data
    code, _, err = cli(*args)
    assert code == 2 and f"{data}:2" in err and "no answer tokens" in err


def test_resume_from_another_run_is_refused(setup, cli):
    root = setup[0]
    distill(_cfg(setup, "other-run", stop_after=1, max_steps=4))
    code, _, err = cli(*_args(setup, "mine", "--lr", "0.5", "--resume",
                              root / "other-run.work" / "checkpoint"))
    assert code == 2 and "another run" in err and "lr" in err


def test_distillation_without_teacher_is_refused(setup, cli):
    args = _args(setup, "noteacher")
    i = args.index("--teacher")
    del args[i:i + 2]
    code, _, err = cli(*args)
    assert code == 2 and "--alpha-ce 1" in err


@pytest.mark.slow
def test_two_processes_match_one(setup, tmp_path, autocast_mode):
    """Same global batch (1 x 4 vs 2 x 2): the loss curves agree to 1e-5 relative in float32
    (reductions in a different order are the only difference), 2e-2 under bf16 autocast (the
    micro-batch shapes differ, so bf16 rounds differently)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    root, teacher, student, data = setup
    one = distill(_cfg(setup, f"one-{autocast_mode}", max_steps=4))
    # `--multi_gpu` selects accelerate's torchrun launcher; `--device cpu` makes it DDP over gloo
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29517 + AUTOCAST_MODES.index(autocast_mode)),
           "-m", "slmkit", "distill", "--student", str(student), "--teacher", str(teacher),
           "--data", str(data), "--out", str(root / f"two-{autocast_mode}"), "--max-steps", "4", "--batch-size", "2",
           "--lr", "3e-3", "--eval-every", "4", "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # any failure fails: a launcher or process crash leaves no Python traceback (a signal, gloo
    # aborting), and it is as much a failure as one that does
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    two = root / f"two-{autocast_mode}"
    assert json.loads((two / "training_record.json").read_text())["processes"] == 2
    curve1 = [m["loss"] for m in _metrics(one) if "loss" in m]
    curve2 = [m["loss"] for m in _metrics(two) if "loss" in m]
    assert len(curve1) == len(curve2) == 4
    assert curve2 == pytest.approx(curve1, rel=REL_TOL[autocast_mode])
    a, b = _weights(one), _weights(two)
    # Adam scales every update to ~lr (3e-3): under bf16, where a gradient element is near 0 its
    # rounding can flip that element's update, 2 x lr a step (measured: 6e-3 on 1 of 1024 weights)
    weight_tol = {"off": 1e-5, "bf16": 1.5e-2}[autocast_mode]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=100 * weight_tol, atol=weight_tol)


def _direct_sums(student_dir, teacher_dir, examples, term) -> tuple[float, int]:
    """Sums of `term(student_out, teacher_out, mask) -> (sum, count)` over `examples`, computed
    directly: one unpadded forward per example (logits and hidden states, no batching, no
    padding), mask being its answer mask from `encode`."""
    from slmkit import models
    from slmkit.data import encode

    student, tok = models.load_model(student_dir)
    teacher, _ = models.load_model(teacher_dir)
    total = n = 0
    with torch.no_grad():
        for ex in examples:
            ids, mask = encode(ex, tok)
            x = torch.tensor([ids])
            got, count = term(student(x, output_hidden_states=True),
                              teacher(x, output_hidden_states=True), mask)
            total, n = total + got, n + count
    return total, n


def _prompt_kl(s_out, t_out, mask) -> tuple[float, int]:
    """Forward KL(teacher || student) summed over the prompt tokens, and their count."""
    s, t = s_out.logits[0, :-1].log_softmax(-1), t_out.logits[0, :-1].log_softmax(-1)
    prompt = torch.tensor(mask[1:]) == 0  # column c predicts token c + 1
    return float((t.exp() * (t - s)).sum(-1)[prompt].sum()), int(prompt.sum())


def _step_one_examples(setup) -> list:
    """The examples step 1 trains on, in the order `slm distill` batches them (batch 4, seed 0)."""
    from slmkit import models
    from slmkit.distill import encode_all, epoch_batches, split_rows

    root, teacher, student, data = setup
    train, _ = split_rows(str(data), None, 0.05, 200)
    tok = models.load_tokenizer(str(student))
    batch = epoch_batches([len(e.ids) for e in encode_all(train, tok, 1024)], 4, 0, 0)[0]
    return [train[i][1] for i in batch]


def test_prompt_kd_is_the_kl_over_the_prompt_tokens(setup):
    # lr 0: the logged term of step 1 is the untouched student's KL on that step's batch, which
    # pins the masks down (left padding, each row's first token and the answers excluded)
    root, teacher, student, data = setup
    out = distill(_cfg(setup, "pkd_lr0", prompt_kd=1.0, lr=0.0, max_steps=1))
    logged = next(r for r in _metrics(out) if r["step"] == 1)["prompt_kd"]
    total, n = _direct_sums(student, teacher, _step_one_examples(setup), _prompt_kl)
    assert logged == pytest.approx(total / n, rel=path_tol(1e-4))


def test_prompt_kd_teaches_the_prompt_tokens_too(setup):
    from slmkit.data import load_examples

    root, teacher, _, data = setup
    held = load_examples(str(data), None, split="eval")
    plain = distill(_cfg(setup, "answers_only"))
    both = distill(_cfg(setup, "with_prompt", prompt_kd=1.0))
    assert not any("prompt_kd" in r for r in _metrics(plain))
    kl_plain, kl_both = (_direct_sums(s, teacher, held, _prompt_kl)[0] for s in (plain, both))
    assert kl_both < 0.97 * kl_plain  # measured 1.148 vs 1.211 nats a token


def test_prompt_kd_needs_an_online_teacher(setup, cli):
    root, teacher, student, data = setup
    code, _, err = cli("distill", "--student", student, "--data", data, "--out", root / "x",
                       "--alpha-ce", "1", "--prompt-kd", "1")
    assert code == 2 and "--prompt-kd needs an online --teacher" in err


def _hidden_sums(student_dir, teacher_dir, examples, pairs) -> tuple[float, int]:
    """Summed mean-over-pairs cosine distance between student layer j's and teacher layer t's
    outputs (hidden_states[j + 1], [t + 1]) over every token of `examples`, and the token count."""
    def distance(s_out, t_out, mask):
        s, t = s_out.hidden_states, t_out.hidden_states
        d = sum(1 - torch.cosine_similarity(s[j + 1][0], t[k + 1][0], dim=-1) for j, k in pairs)
        return float(d.sum()) / len(pairs), len(mask)

    return _direct_sums(student_dir, teacher_dir, examples, distance)


def test_hidden_kd_is_the_cosine_distance_of_the_matched_layers(setup):
    # lr 0: step 1 logs the untouched student's distance on that step's batch, padding excluded;
    # the 2-layer student has no prune plan, so its first layer stands for the teacher's second
    root, teacher, student, data = setup
    out = distill(_cfg(setup, "hkd_lr0", hidden_kd=1.0, lr=0.0, max_steps=1))
    logged = next(r for r in _metrics(out) if r["step"] == 1)["hidden_kd"]
    total, n = _hidden_sums(student, teacher, _step_one_examples(setup), [(0, 1)])
    assert logged == pytest.approx(total / n, rel=path_tol(1e-4))


def test_hidden_kd_brings_the_matched_layers_closer(setup):
    from slmkit.data import load_examples

    root, teacher, _, data = setup
    held = load_examples(str(data), None, split="eval")
    plain = distill(_cfg(setup, "no_hidden"))
    matched = distill(_cfg(setup, "with_hidden", hidden_kd=10.0))
    assert not any("hidden_kd" in r for r in _metrics(plain))
    d_plain, d_matched = (_hidden_sums(s, teacher, held, [(0, 1)])[0] for s in (plain, matched))
    assert d_matched < 0.93 * d_plain  # measured 1884 vs 2195 (0.86)


def test_hidden_kd_layer_map(tmp_path):
    from types import SimpleNamespace

    from slmkit.distill import layer_pairs

    def conf(layers, hidden):
        return SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)

    # no plan: 3 layers spread over 12, the last one left to the logits
    assert layer_pairs(tmp_path, conf(3, 64), conf(12, 64)) == ([(0, 3), (1, 7)], None)
    with pytest.raises(UsageError, match="no prune_plan.json"):
        layer_pairs(tmp_path, conf(3, 48), conf(12, 64))
    # slm prune's plan names the teacher layers and hidden channels kept
    plan = {"shape_before": {"layers": 12, "hidden": 64},
            "kept": {"layers": [0, 1, 5, 11], "hidden": list(range(0, 64, 2))}}
    (tmp_path / "prune_plan.json").write_text(json.dumps(plan))
    assert layer_pairs(tmp_path, conf(4, 32), conf(12, 64)) == (
        [(0, 0), (1, 1), (2, 5)], list(range(0, 64, 2)))
    # a plan of another model's cut does not describe this teacher: spread evenly instead
    assert layer_pairs(tmp_path, conf(4, 32), conf(8, 32))[0] == [(0, 1), (1, 3), (2, 5)]


def test_hidden_kd_needs_a_local_teacher(setup, cli):
    root, teacher, student, data = setup
    code, _, err = cli("distill", "--student", student, "--data", data, "--out", root / "x",
                       "--alpha-ce", "1", "--hidden-kd", "1")
    assert code == 2 and "--hidden-kd needs a local online --teacher" in err


def test_missing_data_is_reported_before_any_model_loads(setup, cli, tmp_path):
    root, teacher, student, _ = setup
    for extra in ([], ["--cache-teacher", tmp_path / "c.safetensors"]):
        code, _, err = cli("distill", "--student", tmp_path / "no-model", "--teacher", teacher,
                           "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "o", *extra)
        assert code == 2 and "missing.jsonl` does not exist" in err and "Traceback" not in err


# --------------------------------------------------------------------------- memory

def test_activation_checkpointing_changes_memory_not_results(setup):
    plain = distill(_cfg(setup, "ckpt-off", activation_checkpointing="off", max_steps=3))
    ckpt = distill(_cfg(setup, "ckpt-on", activation_checkpointing="on", max_steps=3))
    assert json.loads((ckpt / "training_record.json").read_text())["activation_checkpointing"] is True
    a, b = _weights(plain), _weights(ckpt)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_auto_rule():
    from types import SimpleNamespace

    from slmkit.distill import checkpointing_pays

    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    cfg = lambda b: DistillConfig(student="s", data="d", out="o", batch_size=b, alpha_ce=1.0)  # noqa: E731
    # 8 x 1024 tokens keep ~5.3 GB of activations against 2.2 GB of training state: on
    assert checkpointing_pays(cfg(8), smol, 134_515_008, 1024)
    # one 300-token example keeps ~190 MB: recomputing it would only cost time
    assert not checkpointing_pays(cfg(1), smol, 134_515_008, 300)


_PEAK_STEP = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from conftest import CORPUS, make_tokenizer
from slmkit.distill import DistillConfig, distill

root, vocab = Path(sys.argv[2]), int(sys.argv[3])
tok = make_tokenizer()
for name, layers in (("teacher", 2), ("student", 1)):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
    tok.save_pretrained(root / name)
with open(root / "data.jsonl", "w") as f:
    for i in range(8):
        f.write(json.dumps({"text": " ".join(CORPUS[(i + j) % 10] for j in range(2))}) + "\n")
distill(DistillConfig(student=str(root / "student"), teacher=str(root / "teacher"),
                      data=str(root / "data.jsonl"), out=str(root / "out"), batch_size=7,
                      max_steps=1, eval_every=100, eval_fraction=0.05, chunk=16, device="cpu"))
print(json.dumps({"positions": sum(len(tok(" ".join(CORPUS[(i + j) % 10] for j in range(2))).input_ids) - 1
                                   for i in range(7)),
                  "peak": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024}))
"""


@pytest.mark.slow
def test_memory_grows_with_the_chunk_not_with_batch_length_vocab(tmp_path):
    """One distill step with a 262,144-entry vocabulary (Gemma's) against the same step at 49,152:
    ~450 positions, so a (positions x vocab) float32 tensor is ~380 MB more per copy, and the
    student's and teacher's logits alone would be two such copies; --chunk 16 keeps ~14 MB more
    per copy, a few copies alive at once, plus 3.4M more parameters' training state.
    glibc's malloc is told to return freed blocks over 64 KiB at once (MALLOC_MMAP_THRESHOLD_),
    so peak RSS measures live memory, not blocks the allocator keeps for reuse."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc")
    peaks = {}
    for vocab in (49_152, 262_144):
        (tmp_path / str(vocab)).mkdir()
        proc = subprocess.run([sys.executable, "-c", _PEAK_STEP, str(ROOT / "tests"), str(tmp_path / str(vocab)),
                               str(vocab)], capture_output=True, text=True, timeout=300,
                              env=os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                                                "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[vocab] = json.loads(proc.stdout.strip().splitlines()[-1])
    positions = peaks[49_152]["positions"]
    growth = peaks[262_144]["peak"] - peaks[49_152]["peak"]
    extra_vocab = 262_144 - 49_152
    one_copy = positions * extra_vocab * 4  # a float32 (positions x vocab) tensor's growth
    # 10 chunk-sized float32 copies, and 20 bytes for each extra parameter (student: weights,
    # gradients, AdamW moments; teacher: weights)
    bound = 10 * 16 * extra_vocab * 4 + 20 * 16 * extra_vocab
    assert positions > 400 and bound < 0.6 * one_copy  # the test tells the two apart
    assert growth < bound, (growth / 2**20, bound / 2**20, one_copy / 2**20)


# --------------------------------------------------------------------------- packing

def test_pack_places_examples_and_masks_each_first_token():
    from slmkit.distill import Encoded, collate, pack

    ex = [Encoded([1, 2, 3], [1, 1, 1], "L1", "a"), Encoded([4, 5], [0, 1], "L2", "b"),
          Encoded([6, 7, 8, 9], [0, 0, 1, 1], "L3", "c")]
    rows = pack(ex, max_length=6)
    assert [[p.key for p in r.segments] for r in rows] == [["L3", "L2"], ["L1"]]
    assert rows[0].ids == [6, 7, 8, 9, 4, 5] and rows[0].mask == [0, 0, 1, 1, 0, 1]
    assert rows[1].mask == [0, 1, 1] and sum(r.targets for r in rows) == sum(e.targets for e in ex)
    ids, att, mask, pos = collate(rows, pad_id=0)
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # the padding a run of its own
    assert att.tolist()[1] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("prompt_kd,edit_weight", [(0.0, 1.0), (1.0, 1.0), (0.0, 3.0)])
def test_packed_batch_gives_the_unpacked_loss(setup, tmp_path, prompt_kd, edit_weight):
    # lr 0, one step over all 10 training lines (pairs and plain text): packed into one row or
    # each a row of its own, the KD, CE (and prompt KD) means are the same
    root, teacher, student, data = setup
    mixed = tmp_path / "mixed.jsonl"
    lines = data.read_text().splitlines()[:6] + [json.dumps({"text": CORPUS[i]}) for i in range(4)]
    mixed.write_text("".join(line + "\n" for line in lines) + json.dumps({"text": "x y", "split": "eval"}) + "\n")
    rows = {}
    for packed, batch in ((False, 10), (True, 1)):
        out = distill(DistillConfig(student=str(student), teacher=str(teacher), data=str(mixed),
                                    out=str(tmp_path / f"p{packed}"), lr=0.0, max_steps=1,
                                    batch_size=batch, alpha_ce=0.5, prompt_kd=prompt_kd,
                                    edit_weight=edit_weight, pack=packed, eval_every=100,
                                    device="cpu"))
        rows[packed] = next(r for r in _metrics(out) if r["step"] == 1)
    assert rows[True]["tokens"] == rows[False]["tokens"]
    for k in ("kd", "ce") + (("prompt_kd",) if prompt_kd else ()):
        assert rows[True][k] == pytest.approx(rows[False][k], rel=path_tol(1e-5)), k


def test_pack_with_on_policy_is_refused(setup):
    with pytest.raises(UsageError, match="--pack and --on-policy"):
        _cfg(setup, "x", pack=True, on_policy=0.5)


# --------------------------------------------------------------------------- FSDP

def _launch_two(setup, out, *extra, port: int):
    """`slm distill` in 2 CPU processes (accelerate launch, gloo), batch 2 each: global batch 4."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    root, teacher, student, data = setup
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "slmkit", "distill", "--student", str(student), "--teacher", str(teacher),
           "--data", str(data), "--out", str(root / out), "--max-steps", "4", "--batch-size", "2",
           "--lr", "3e-3", "--eval-every", "4", "--device", "cpu", *map(str, extra)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "SLMKIT_AUTOCAST": "off"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # any failure fails: a launcher or process crash leaves no Python traceback (a signal, gloo
    # aborting), and it is as much a failure as one that does
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return root / out


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume(setup, monkeypatch):
    """FSDP2 over 2 processes (float32): the loss curve of 1 process at the same global batch to
    1e-5 relative (reduce-scatter sums in another order), and a run killed at step 2 and rerun
    ends with the uninterrupted run's weights (1e-6: the same arithmetic, resumed from shards)."""
    monkeypatch.setenv("SLMKIT_AUTOCAST", "off")
    one = distill(_cfg(setup, "fsdp-one", max_steps=4))
    two = _launch_two(setup, "fsdp-two", "--fsdp", port=29541)
    record = json.loads((two / "training_record.json").read_text())
    assert record["processes"] == 2 and record["config"]["fsdp"]
    curve1 = [m["loss"] for m in _metrics(one) if "loss" in m]
    curve2 = [m["loss"] for m in _metrics(two) if "loss" in m]
    assert len(curve2) == 4 and curve2 == pytest.approx(curve1, rel=1e-5)
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

    out = _launch_two(setup, "fsdp-resumed", "--fsdp", "--stop-after", 2, port=29542)
    assert (out.with_name("fsdp-resumed.work") / "checkpoint" / "model-1.safetensors").is_file()
    resumed = _launch_two(setup, "fsdp-resumed", "--fsdp", port=29543)
    c = _weights(resumed)
    for k in b:
        torch.testing.assert_close(b[k], c[k], rtol=0, atol=1e-6)
    assert [m["step"] for m in _metrics(resumed)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_fsdp_with_frozen_attention_keeps_it(setup):
    """FSDP2 shards frozen and trained tensors in one unit: the frozen ones come back as pruned."""
    out = _launch_two(setup, "fsdp-frozen", "--fsdp", "--freeze", "attention", port=29544)
    before, after = _weights(setup[2]), _weights(out)
    kept = {k for k in after if torch.equal(before[k], after[k])}
    assert kept and kept == {k for k in after if "embed_tokens" in k or "lm_head" in k
                             or ".self_attn." in k}


def test_fsdp_needs_a_launcher(setup, cli):
    code, _, err = cli(*_args(setup, "fsdp-alone", "--fsdp"))
    assert code == 2 and "accelerate launch" in err


# --------------------------------------------------------------------------- served teacher

def test_served_teacher_kd_equals_the_offline_cache(setup, tmp_path):
    # the same teacher, its top-8 log-probs read from a file or asked of `slm serve` over HTTP
    # (vLLM's prompt_logprobs): the same KD, to the cache's float16 storage (~1e-3 relative)
    from slmkit.serve import start_server

    root, teacher, student, data = setup
    cache = cache_teacher(_cfg(setup, "k8-cache"), tmp_path / "k8.safetensors", k=8)
    offline = distill(_cfg(setup, "k8-offline", teacher=None, teacher_cache=str(cache), lr=0.0,
                           max_steps=2))
    with start_server([str(teacher)], names=["teacher"]) as server:
        served = distill(_cfg(setup, "k8-served", teacher=f"openai:teacher@{server.url}", top_k=8,
                              lr=0.0, max_steps=2))
    a, b = _metrics(offline), _metrics(served)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        for k in ("kd", "eval_kd"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=path_tol(2e-3)), (x["step"], k)


def test_served_teacher_without_prompt_logprobs_or_with_another_tokenizer(setup, tmp_path, cli):
    from slmkit.backends.hf import HFBackend
    from slmkit.serve import start_server
    from slmkit.served_teacher import ServedTeacher

    root, teacher, student, data = setup

    class NoScoring(HFBackend):
        def score_prompt(self, ids, k):
            raise NotImplementedError("this backend cannot score prompts")

    with start_server([NoScoring(str(teacher), name="plain")]) as server:
        code, _, err = cli(*_args(setup, "served-bad", "--teacher", f"openai:plain@{server.url}"))
    assert code == 2 and f"{server.url}/v1/completions" in err and "prompt_logprobs" in err
    assert not (root / "served-bad").exists()
    tok = models.load_tokenizer(str(student))
    st = ServedTeacher("openai:t@http://127.0.0.1:9", tok, k=1)
    ids = tok("hello world").input_ids
    reply = {"choices": [{"prompt_logprobs": [None] + [
        {str(t): {"logprob": -1.0, "rank": 1, "decoded_token": "zz"}} for t in ids[1:]]}]}
    with pytest.raises(UsageError, match="another tokenizer"):
        st.parse(reply, ids)
    with pytest.raises(UsageError, match="scored 1 positions"):
        st.parse({"choices": [{"prompt_logprobs": [None]}]}, ids)


def test_a_damaged_checkpoint_is_one_line(setup, cli):
    ckpt = distill(_cfg(setup, "damaged", stop_after=1, max_steps=3))
    (ckpt / "scheduler.json").write_bytes(b"\xff{not json")
    code, _, err = cli(*_args(setup, "damaged", "--max-steps", 3, "--batch-size", 4, "--lr", "0.003",
                              "--eval-every", 4))
    assert code == 2 and "scheduler.json" in err and "Traceback" not in err


def test_final_hidden_then_lm_head_equals_the_logits(tiny_model):
    # the loss projects hidden states itself (memory bounded in the vocabulary): for every
    # architecture slmkit trains, that must be exactly the model's own logits
    from slmkit.distill import final_hidden

    model, _ = models.load_model(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=4).logits
        with final_hidden(model) as lm_head:
            hidden = model(input_ids=ids, logits_to_keep=4).logits
        assert hidden.shape == (1, 4, model.config.hidden_size)
        torch.testing.assert_close(lm_head(hidden), logits, rtol=0, atol=0)
    assert model.get_output_embeddings() is lm_head  # put back


def test_top_k_default_fits_what_a_served_teacher_returns(tmp_path):
    """A served teacher (vLLM, slm serve) returns at most 20 log-probs a position by default, so
    that is the default k it is asked for; a local teacher's cache keeps 32; a given k stays."""
    base = dict(student="s", data="d.jsonl", out=str(tmp_path / "o"))
    assert DistillConfig(teacher="openai:t@http://127.0.0.1:1", **base).top_k == 20
    assert DistillConfig(teacher="t", **base).top_k == 32
    assert DistillConfig(teacher="openai:t@http://127.0.0.1:1", top_k=8, **base).top_k == 8


# --------------------------------------------------------------------------- --edit-weight

def test_edit_weights_weigh_what_the_answer_does_not_copy():
    from slmkit.distill import edit_weights

    # prompt 5 6 7 8, answer 5 9 7 8 EOS(2): 9 and the EOS are edits, 5 7 8 copies
    ids, mask = [5, 6, 7, 8, 5, 9, 7, 8, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1]
    w = edit_weights(ids, mask, 4.0)
    scale = 5 / (3 * 1 + 2 * 4)  # the five answer tokens average 1
    assert w == pytest.approx([0, 0, 0, 0, scale, 4 * scale, scale, scale, 4 * scale])
    assert edit_weights(ids, mask, 1.0) == pytest.approx([float(m) for m in mask])
    assert edit_weights([5, 6], [0, 0], 3.0) == [0.0, 0.0]  # nothing counted: no division by 0


def test_edit_weight_is_the_weighted_mean_of_the_token_losses(setup):
    """lr 0, CE only, one step: the logged CE is the mean of the untouched student's per-token CE
    weighted by edit_weights() over that step's batch, and differs from the plain mean."""
    import torch.nn.functional as F

    from slmkit.distill import edit_weights, epoch_batches

    root, _, student, data = setup
    logged = {}
    for w in (1.0, 4.0):
        out = distill(_cfg(setup, f"ew{w}", teacher=None, alpha_ce=1.0, lr=0.0, max_steps=1,
                           edit_weight=w))
        logged[w] = next(r for r in _metrics(out) if r["step"] == 1)["ce"]
    train, _ = split_rows(str(data), None, 0.05, 200)
    model, tok = models.load_model(str(student))
    encoded = encode_all(train, tok, 1024)
    batch = epoch_batches([len(e.ids) for e in encoded], 4, 0, 0)[0]
    total = n = 0.0
    for e in (encoded[i] for i in batch):
        with torch.no_grad():
            logits = model(torch.tensor([e.ids])).logits[0, :-1].float()
        ce = F.cross_entropy(logits, torch.tensor(e.ids[1:]), reduction="none")
        w = torch.tensor(edit_weights(e.ids, e.mask, 4.0)[1:])
        total += float((ce * w).sum())
        n += e.targets
    assert logged[4.0] == pytest.approx(total / n, rel=path_tol(1e-4))
    assert abs(logged[4.0] - logged[1.0]) > 1e-3 * logged[1.0]


def test_edit_weight_must_be_positive(setup):
    with pytest.raises(UsageError, match="edit.weight"):
        _cfg(setup, "x", edit_weight=0)


def test_malloc_returns_big_blocks_only_for_big_micro_batches(monkeypatch):
    """M_MMAP_THRESHOLD (1 MiB) bounds fragmentation at batch 8 x 1024 but makes every big block
    a fresh mapping; small micro-batches (the demo's 1 x 320) keep glibc's default."""
    import ctypes

    from slmkit import distill as D

    calls = []

    class Libc:
        def mallopt(self, what, value):
            calls.append((what, value))

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    D.return_freed_memory(1 * 320)
    assert calls == []
    D.return_freed_memory(8 * 1024)
    assert calls == [(-3, 1 << 20)]
