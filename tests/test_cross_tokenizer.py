"""`slm distill` across tokenizers: a byte-level BPE model teaches a SentencePiece-style one and
back, from the local model or a text-keyed cache; the same-tokenizer pair gives the direct KD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CORPUS, make_chat_sp_tokenizer, make_tiny_model, make_tiny_model_with, path_tol
from slmkit import models
from slmkit.distill import DistillConfig, cache_teacher, distill
from slmkit.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """teacher (byte-level BPE, 4 layers), student of the same tokenizer (2 layers), student and
    teacher of the SentencePiece-style tokenizer, and 24 train + 4 eval pairs with hard text."""
    root = tmp_path_factory.mktemp("xtok")
    sp = make_chat_sp_tokenizer()
    paths = {"teacher": make_tiny_model("llama", root / "teacher", seed=0),
             "student": make_tiny_model("llama", root / "student", layers=2, seed=1),
             "sp_student": make_tiny_model_with(sp, "qwen2", root / "sp_student", layers=2, seed=2),
             "sp_teacher": make_tiny_model_with(sp, "llama", root / "sp_teacher", seed=3)}
    extra = ["Grüße 2024: 3.14 😀", "日本語 text\n\n  spaced", "x = 1,000,000!"]
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(28):
            out = CORPUS[(3 * i + 1) % 10] + (" " + extra[i % 3] if i % 2 else "")
            row = {"input": CORPUS[i % 10], "output": out}
            f.write(json.dumps(row | ({"split": "eval"} if i >= 24 else {})) + "\n")
    return root, paths, data


def _cfg(pair, out, **kw) -> DistillConfig:
    root, paths, data = pair
    base = dict(student=str(paths["sp_student"]), teacher=str(paths["teacher"]), data=str(data),
                out=str(root / out), max_steps=8, batch_size=4, lr=3e-3, eval_every=4,
                save_every=100, device="cpu")
    return DistillConfig(**(base | kw))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _evals(folder: Path) -> list[float]:
    return [m["eval_kd"] for m in _metrics(folder) if "eval_kd" in m]


def test_on_equals_off_for_a_same_tokenizer_pair(pair):
    # the text path pairs every position with itself and maps every token to itself
    root, paths, _ = pair
    kw = dict(student=str(paths["student"]), max_steps=2, eval_every=2)
    off = _metrics(distill(_cfg(pair, "same-off", cross_tokenizer="off", **kw)))
    on = _metrics(distill(_cfg(pair, "same-on", cross_tokenizer="on", **kw)))
    assert [r["step"] for r in off] == [r["step"] for r in on] == [0, 1, 2]
    for a, b in zip(off, on):
        for key in ("kd", "ce", "eval_kd", "eval_ce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    assert _weights(root / "same-off").keys() == _weights(root / "same-on").keys()
    for k, v in _weights(root / "same-off").items():
        torch.testing.assert_close(_weights(root / "same-on")[k], v)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("student,teacher", [("sp_student", "teacher"), ("student", "sp_teacher")])
def test_training_across_tokenizers_lowers_heldout_kd(pair, student, teacher):
    root, paths, _ = pair
    out = distill(_cfg(pair, f"x-{student}", student=str(paths[student]), teacher=str(paths[teacher])))
    evals = _evals(out)
    assert len(evals) == 3 and evals[-1] < evals[0] * 0.9, evals
    before, after = _weights(paths[student]), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    record = json.loads((out / "training_record.json").read_text())
    assert record["config"]["cross_tokenizer"] == "auto"


def test_one_cache_teaches_students_of_both_tokenizers_like_the_local_teacher(pair, tmp_path):
    # k = the teacher's whole vocabulary: the cached rows are its full distributions, so reading
    # them equals the local teacher, whatever the student, to the cache's float16 storage: the
    # stored probabilities sum to 1 +- ~1e-3, which the tail bucket counts (measured: 0.3 %)
    root, paths, _ = pair
    v = len(models.load_tokenizer(paths["teacher"]))
    cache = cache_teacher(_cfg(pair, "unused"), tmp_path / "topk.safetensors", k=v)
    meta_k = load_file(str(cache))  # the file is text-keyed: no student token ids in it
    assert not any(k.startswith("L") for k in meta_k)
    for student in ("sp_student", "student"):
        kw = dict(student=str(paths[student]), lr=0.0, max_steps=1, eval_every=1)
        local = _metrics(distill(_cfg(pair, f"local-{student}", **kw)))
        cached = _metrics(distill(_cfg(pair, f"cached-{student}", teacher=None,
                                       teacher_cache=str(cache), **kw)))
        for a, b in zip(local, cached):
            for key in ("kd", "eval_kd"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-2), (student, a["step"], key)
    # and a small k trains a student of the other tokenizer
    small = cache_teacher(_cfg(pair, "unused"), tmp_path / "k8.safetensors", k=8)
    out = distill(_cfg(pair, "cached-k8", teacher=None, teacher_cache=str(small)))
    evals = _evals(out)
    assert evals[-1] < evals[0], evals


def test_final_eval_is_of_the_final_step_when_max_tokens_ends_early(pair):
    root, paths, _ = pair
    kw = dict(student=str(paths["sp_student"]), max_steps=6, eval_every=2)
    full = _metrics(distill(_cfg(pair, "mt-full", **kw)))
    t3 = next(r["tokens"] for r in full if r["step"] == 3)
    out = distill(_cfg(pair, "mt-3", max_tokens=t3, **kw))  # ends at step 3 of 6
    record = json.loads((out / "training_record.json").read_text())
    assert record["steps"] == 3
    again = _metrics(distill(_cfg(pair, "mt-check", student=str(out), lr=0.0, max_steps=1)))
    assert record["final_eval"]["eval_ce"] == pytest.approx(again[0]["eval_ce"], rel=1e-5)
    step2 = next(r for r in _metrics(out) if r["step"] == 2)
    assert record["final_eval"]["eval_ce"] != pytest.approx(step2["eval_ce"], rel=1e-6)


def _args(pair, out, *extra):
    root, paths, data = pair
    return ["distill", "--student", paths["sp_student"], "--teacher", paths["teacher"], "--data",
            data, "--out", root / out, "--max-steps", 1, "--device", "cpu", *extra]


@pytest.mark.parametrize("flags,says", [(("--on-policy", "0.5"), "--on-policy"),
                                        (("--hidden-kd", "1"), "--hidden-kd"),
                                        (("--prompt-kd", "1"), "--prompt-kd"),
                                        (("--pack",), "--pack")])
def test_what_the_text_path_does_not_do_is_refused_before_models_load(pair, cli, monkeypatch,
                                                                      flags, says):
    root, paths, data = pair

    def no_load(*a, **kw):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    code, _, err = cli(*_args(pair, "refused", *flags))
    assert code == 2 and says in err and "across tokenizers" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (root / "refused").exists()


def test_cache_and_flag_mismatches_are_one_line(pair, cli, tmp_path):
    root, paths, data = pair
    v1 = tmp_path / "v1.safetensors"
    save_file({"L1.ids": torch.zeros(1, 1, dtype=torch.int32)}, str(v1), metadata={"format": "slmkit-topk-v1"})
    code, _, err = cli("distill", "--student", paths["sp_student"], "--teacher-cache", v1, "--data", data,
                       "--out", root / "v1", "--cross-tokenizer", "on", "--device", "cpu")
    assert code == 2 and "rewrite" in err and "--cache-teacher" in err, err
    v2 = cache_teacher(_cfg(pair, "unused"), tmp_path / "v2.safetensors", k=4)
    code, _, err = cli("distill", "--student", paths["sp_student"], "--teacher-cache", v2, "--data", data,
                       "--out", root / "v2", "--cross-tokenizer", "off", "--device", "cpu")
    assert code == 2 and "text-keyed" in err, err
    code, _, err = cli(*_args(pair, "served-on", "--cross-tokenizer", "on"))
    assert code == 0  # a local pair: fine
    code, _, err = cli("distill", "--student", paths["sp_student"], "--teacher", "openai:t@http://127.0.0.1:9",
                       "--data", data, "--out", root / "served", "--cross-tokenizer", "on", "--device", "cpu")
    assert code == 2 and "slm generate" in err, err
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": f"yo {i}"}]}) + "\n"
                            for i in range(6)))
    code, _, err = cli("distill", "--student", paths["sp_student"], "--teacher", paths["teacher"],
                       "--data", chat, "--out", root / "chat", "--batch-size", 2, "--device", "cpu")
    assert code == 2 and "messages" in err and "chat.jsonl:1" in err, err


def test_a_served_id_beyond_the_students_vocabulary_is_one_line(pair):
    from slmkit.served_teacher import ServedTeacher

    root, paths, _ = pair
    tok = models.load_tokenizer(paths["student"])
    st = ServedTeacher("openai:t@http://127.0.0.1:9", tok, k=1, vocab_size=len(tok))
    ids = tok("hello world").input_ids
    reply = {"choices": [{"prompt_logprobs": [None] + [
        {str(len(tok) + 5): {"logprob": -0.1, "rank": 1, "decoded_token": "zz"}} for _ in ids[1:]]}]}
    with pytest.raises(UsageError, match="outside the vocabulary of .*--teacher-tokenizer"):
        st.parse(reply, ids)


def test_a_v1_cache_still_reads_and_equals_the_text_path(pair, tmp_path):
    # a v1 file (rows by student token id, keyed by data line) made from the v2 rows of a
    # same-tokenizer pair: the direct path reading it and the text path reading v2 agree
    from slmkit import align, topk_cache
    from slmkit.data import encode, file_hash
    from slmkit.distill import split_rows, vocab_hash

    root, paths, data = pair
    tok = models.load_tokenizer(paths["student"])
    v2 = cache_teacher(_cfg(pair, "unused"), tmp_path / "v2.safetensors", k=8)
    reader = topk_cache.Reader(v2)
    train, held = split_rows(str(data), None, 0.1, 100)
    tensors = {}
    for n, ex in train + held:
        ids, _ = encode(ex, tok)
        _, _, top, lp = reader.get(align.text_key(ex), ex.where)
        tensors |= {f"L{n}.tokens": torch.tensor(ids, dtype=torch.int32),
                    f"L{n}.ids": top.int().contiguous(), f"L{n}.logprobs": lp.half().contiguous()}
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata={"format": "slmkit-topk-v1", "k": "8",
                                          "tokenizer": vocab_hash(tok), "data": file_hash(data),
                                          "task": "None", "max_length": "1024"})
    kw = dict(student=str(paths["student"]), teacher=None, lr=0.0, max_steps=1, eval_every=1)
    a = _metrics(distill(_cfg(pair, "read-v1", teacher_cache=str(v1), **kw)))
    b = _metrics(distill(_cfg(pair, "read-v2", teacher_cache=str(v2), **kw)))
    for x, y in zip(a, b):
        for key in ("kd", "eval_kd"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6), (x["step"], key)


def test_served_rows_are_dropped_after_their_batch_but_the_held_out_ones(pair, monkeypatch):
    from slmkit.distill import Encoded
    from slmkit.served_teacher import ServedTeacher

    root, paths, _ = pair
    tok = models.load_tokenizer(paths["student"])
    st = ServedTeacher("openai:t@http://127.0.0.1:9", tok, k=2)
    asked = []

    def ask(ids):
        asked.append(ids)
        return torch.zeros(len(ids) - 1, 2), torch.zeros(len(ids) - 1, 2, dtype=torch.long)

    monkeypatch.setattr(st, "_ask", ask)
    train = [Encoded([1, 2, 3, 4], [0, 0, 1, 1], "a", "x"), Encoded([1, 5, 6], [0, 1, 1], "b", "y")]
    held = [Encoded([7, 8, 9], [0, 1, 1], "c", "z")]
    st.keep = {tuple(e.ids) for e in held}
    for _ in range(2):
        lp, ids = st.topk(train, "cpu")
        assert lp.shape == (4, 2)
        st.topk(held, "cpu")
    assert list(st.rows) == [(7, 8, 9)]  # only the held-out rows stay
    assert len(asked) == 5  # the training rows asked again each epoch, the held-out ones once


def test_a_served_teacher_of_another_tokenizer_equals_the_local_one(pair, tmp_path):
    # `slm serve` of the byte-level teacher, the student of the SentencePiece-style tokenizer:
    # encoded here with --teacher-tokenizer, scored by the server (prompt_logprobs by id), the
    # top-k rows mapped. Against a local cache of the same top-k: the same KD (float16 storage)
    from slmkit.serve import start_server

    root, paths, _ = pair
    cache = cache_teacher(_cfg(pair, "unused"), tmp_path / "k8.safetensors", k=8)
    kw = dict(lr=0.0, max_steps=2, eval_every=2)
    offline = _metrics(distill(_cfg(pair, "srv-offline", teacher=None, teacher_cache=str(cache), **kw)))
    with start_server([str(paths["teacher"])], names=["teacher"]) as server:
        served = _metrics(distill(_cfg(pair, "srv-served", teacher=f"openai:teacher@{server.url}",
                                       teacher_tokenizer=str(paths["teacher"]), top_k=8, **kw)))
        trained = distill(_cfg(pair, "srv-trained", teacher=f"openai:teacher@{server.url}",
                               teacher_tokenizer=str(paths["teacher"])))
    assert [r["step"] for r in offline] == [r["step"] for r in served] == [0, 1, 2]
    for x, y in zip(offline, served):
        for key in ("kd", "eval_kd"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=path_tol(5e-3)), (x["step"], key)
    evals = _evals(trained)
    assert evals[-1] < evals[0], evals


def test_a_served_teacher_of_another_tokenizer_without_its_tokenizer_is_one_line(pair, cli):
    from slmkit.serve import start_server

    root, paths, data = pair
    with start_server([str(paths["teacher"])], names=["teacher"]) as server:
        code, _, err = cli("distill", "--student", paths["sp_student"], "--teacher",
                           f"openai:teacher@{server.url}", "--data", data, "--out", root / "srv-bad",
                           "--max-steps", 1, "--device", "cpu")
    assert code == 2 and "--teacher-tokenizer" in err and server.url in err, err
    assert "Traceback" not in err and not (root / "srv-bad").exists()


@pytest.mark.slow
def test_two_processes_across_tokenizers_match_one(pair, monkeypatch):
    """DDP over gloo with the text path: the same global batch (1 x 4 vs 2 x 2) gives the same
    loss curve; a crash of the launch fails the test."""
    import os
    import subprocess
    import sys

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    monkeypatch.setenv("SLMKIT_AUTOCAST", "off")
    root, paths, data = pair
    one = distill(_cfg(pair, "xt-one", max_steps=4, eval_every=4))
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           "-m", "slmkit", "distill", "--student", str(paths["sp_student"]), "--teacher",
           str(paths["teacher"]), "--data", str(data), "--out", str(root / "xt-two"),
           "--max-steps", "4", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "4",
           "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "SLMKIT_AUTOCAST": "off",
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    curve1 = [m["loss"] for m in _metrics(one) if "loss" in m]
    curve2 = [m["loss"] for m in _metrics(root / "xt-two") if "loss" in m]
    assert len(curve1) == len(curve2) == 4
    assert curve2 == pytest.approx(curve1, rel=1e-5)


def test_plain_text_across_tokenizers_and_a_cache_of_other_text(pair, tmp_path, cli):
    # {"text"} rows: the whole text is aligned (every token counts but the first); a cache made
    # of other text names the first line it lacks before training starts
    root, paths, _ = pair
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": CORPUS[i % 10] + " 2024 😀 " + CORPUS[(i + 3) % 10]})
                             + "\n" for i in range(12)))
    out = distill(_cfg(pair, "x-plain", data=str(plain), max_steps=4, eval_every=2))
    evals = _evals(out)
    assert evals[-1] < evals[0], evals
    cache = cache_teacher(_cfg(pair, "unused"), tmp_path / "pairs.safetensors", k=4)
    code, _, err = cli("distill", "--student", paths["sp_student"], "--teacher-cache", cache,
                       "--data", plain, "--out", root / "x-other", "--device", "cpu")
    assert code == 2 and "plain.jsonl:" in err and "not in the teacher cache" in err, err
    assert not (root / "x-other").exists() and not (root / "x-other.work").exists()
