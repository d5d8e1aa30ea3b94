"""`slm generate` end to end on the tiny random llama: the hf backend in-process, the openai
backend against a live `slm serve` on loopback, resume after a kill, dedup/decontamination
counts, the top-k cache read back by distill, and bad input (exit 2, nothing generated)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from slmkit import generate as gen
from slmkit.tasks import get_task

DIALOGUES = [
    "#Person1#: Hi, are you coming to the party tonight?\n#Person2#: Yes, I will bring some snacks.",
    "#Person1#: Can you send me the report before the meeting?\n#Person2#: Yes, tomorrow morning.",
    "#Person1#: The cat sleeps in the sun.\n#Person2#: The lazy dog sleeps too.",
    "#Person1#: She goes to the dentist every year.\n#Person2#: She don't like it anyway.",
    "#Person1#: Take one tablet twice a day with food.\n#Person2#: Thanks, I will call you back.",
    "#Person1#: What are your weekend plans?\n#Person2#: The quick brown fox, as always.",
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def long_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama with a 512-token context (RoPE: only the limit changes), so the judge's
    rubric prompts fit."""
    import shutil

    folder = tmp_path_factory.mktemp("long") / "llama"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 512}))
    return folder


@pytest.fixture
def inputs(tmp_path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "dialogue": d} for i, d in enumerate(DIALOGUES)])


def common(tiny, inputs, out, *more):
    return ["generate", "--teacher", tiny, "--task", "summarize", "--inputs", inputs, "--out", out,
            "--max-new-tokens", 6, "--threshold", 0, "--batch-size", 4, *more]


def test_hf_end_to_end_with_provenance_and_topk_cache(cli, long_llama, inputs, tmp_path):
    tiny_llama = long_llama
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(*common(tiny_llama, inputs, out, "-n", 2, "--topk-logprobs", 4, "--json"))
    assert code == 0, err
    stats = json.loads(stdout)
    rows = read_jsonl(out)
    rejected = read_jsonl(gen.side_path(out, "rejected")) if gen.side_path(out, "rejected").exists() else []
    # every input is accounted for exactly once: kept or rejected with a reason
    assert sorted(r["id"] for r in rows + rejected) == [f"d{i}" for i in range(len(DIALOGUES))]
    assert stats["kept"] == len(rows) and sum(stats["dropped"].values()) == len(rejected)
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    for r in rows:
        meta = r["meta"]
        assert meta["teacher"] == str(tiny_llama) and meta["sampling"]["n"] == 2
        assert meta["sampling"]["temperature"] == 0.8 and 1 <= meta["candidates"] <= 2
        assert isinstance(r["summary"], str) and r["summary"] and r["split"] == "train"
        assert len(r["teacher_topk"]["logprobs"][0]) == 4
        assert set(meta["scores"]) == {"reference", "judge"} and meta["scores"]["reference"] is None
    assert stats["judge"] == "P(Yes)"

    # the cache is distill's offline format: keyed by each line's text, the teacher's generated
    # tokens spelling its answer, a row of top-k per token
    from slmkit import align, topk_cache
    from slmkit.data import to_example

    cache = topk_cache.Reader(stats["topk_cache"])
    assert stats["topk_aligned"] == stats["topk_lines"] == len(rows)
    for r in rows:
        ex = to_example(r, "x", get_task("summarize"), need_answer=True)
        tokens, spans, ids, lp = cache.get(align.text_key(ex), "x")
        text = ex.answer.encode()
        assert b"".join(text[a:b] for a, b in spans) == text
        assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))  # they tile it
        assert lp.shape == (len(tokens), 4) and float(lp.exp().sum(-1).max()) <= 1.01


def test_topk_rows_follow_the_teachers_tokens(tiny_llama, tmp_path):
    """A line's rows are the teacher's own, one per generated token of the answer; a completion's
    leading space (stripped from the answer) is cut from its first token's span."""
    import torch

    from slmkit import align, models, topk_cache
    from slmkit.data import _ids, to_example

    tok = models.load_tokenizer(tiny_llama)
    answer = "the cat sleeps in the sun"
    gen_ids = _ids(tok, " " + answer)
    lps = [[-0.1 - 0.01 * j, -2.5, -3.0] for j in range(len(gen_ids))]
    alts = [[t, (t + 1) % len(tok), (t + 2) % len(tok)] for t in gen_ids]
    row = {"id": "x", "dialogue": DIALOGUES[2], "summary": answer,
           "teacher_topk": {"token_ids": gen_ids, "tokens": [tok.decode([t]) for t in gen_ids],
                            "ids": alts, "logprobs": lps}}
    out = write_jsonl(tmp_path / "o.jsonl", [row])
    stats = gen.write_topk_cache(out, "summarize", tok, "t")
    assert stats["topk_aligned"] == 1
    cache = topk_cache.Reader(stats["topk_cache"])
    key = align.text_key(to_example(row, "x", get_task("summarize"), need_answer=True))
    tokens, spans, ids, lp = cache.get(key, "x")
    assert tokens.tolist() == gen_ids and ids.tolist() == alts
    assert torch.allclose(lp, torch.tensor(lps), atol=1e-2)
    assert spans[0][0] == 0 and spans[-1][1] == len(answer)
    # an HTTP teacher (no ids): the same rows, its tokens known by their text
    http = dict(row, teacher_topk={"token_ids": None, "ids": None, "logprobs": lps,
                                   "tokens": [tok.decode([t]) for t in gen_ids],
                                   "texts": [[tok.decode([t]) for t in a] for a in alts]})
    out2 = write_jsonl(tmp_path / "h.jsonl", [http])
    stats = gen.write_topk_cache(out2, "summarize", None, "openai:t@http://x")
    cache = topk_cache.Reader(stats["topk_cache"])
    tokens, spans2, ids2, _ = cache.get(key, "x")
    assert spans2 == spans and [cache.vocab[i] for i in tokens.tolist()] == [
        tok.decode([t]).encode() for t in gen_ids]


def test_resume_after_limit_has_no_duplicate_and_no_lost_line(cli, tiny_llama, inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    args = common(tiny_llama, inputs, out, "-n", 1, "--temperature", 0, "--no-judge")
    assert cli(*args, "--limit", 2)[0] == 0
    first = out.read_text()
    assert len(read_jsonl(out)) == 2
    # a torn last line, as a kill in the middle of a write leaves it
    with open(out, "a") as f:
        f.write('{"id": "d2", "dialogue": "half')
    code, stdout, err = cli(*args, "--json")
    assert code == 0, err
    stats = json.loads(stdout)
    assert stats["done_before"] == 2 and "half-written" in err
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == [f"d{i}" for i in range(len(DIALOGUES))]
    assert out.read_text().startswith(first)  # the earlier lines are untouched


def test_resume_after_kill(cli, tiny_llama, tmp_path):
    rows = [{"id": f"k{i}", "dialogue": f"#Person1#: number {i} is here.\n#Person2#: yes {i} {i}."}
            for i in range(12)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["generate", "--teacher", str(tiny_llama), "--task", "summarize", "--inputs", str(inputs),
            "--out", str(out), "--max-new-tokens", "4", "--threshold", "0", "--batch-size", "1",
            "-n", "1", "--no-judge", "--dedup-threshold", "1"]
    p = subprocess.Popen([sys.executable, "-m", "slmkit", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_before = out.read_text().count("\n")
    assert 1 <= n_before < 12
    code, _, err = cli(*args)
    assert code == 0, err
    ids = [d["id"] for d in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 12


def test_dedup_and_decontamination_counts(cli, tiny_llama, tmp_path):
    base = DIALOGUES[0]
    near = base.replace("tonight", "today")  # one word of 18 changed
    rows = [{"id": "orig", "dialogue": base}, {"id": "same", "dialogue": base},
            {"id": "near", "dialogue": near}, {"id": "other", "dialogue": DIALOGUES[1]},
            {"id": "leak", "dialogue": DIALOGUES[4]}, {"id": "fine", "dialogue": DIALOGUES[3]}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"dialogue": DIALOGUES[4], "summary": "x"},
                                                  {"dialogue": "train only", "split": "train"}])
    out = tmp_path / "out.jsonl"
    # greedy: identical inputs get identical answers, so they are exact duplicates
    code, stdout, err = cli(*common(tiny_llama, inputs, out, "-n", 1, "--temperature", 0, "--no-judge",
                                    "--decontaminate", evals, "--dedup-threshold", 0.5, "--json"))
    assert code == 0, err
    stats = json.loads(stdout)
    assert stats["dropped"].get("contaminated_input") == 1
    assert stats["dropped"].get("duplicate") == 2, stats
    assert sorted(r["id"] for r in read_jsonl(out)) == ["fine", "orig", "other"]
    assert stats["thresholds"] == {"score": 0.0, "dedup_jaccard": 0.5, "decontam_8gram_share": 0.2}


def test_near_dup_and_eval_index_units(tmp_path):
    d = gen.NearDup(0.8)
    text = " ".join(f"word{i}" for i in range(60))
    assert not d.seen("a", text)
    assert d.seen("b", text.replace("word30", "other"))  # 3 of 58 shingles differ: J ~ 0.9
    assert not d.seen("c", " ".join(f"thing{i}" for i in range(60)))
    idx = gen.EvalIndex(write_jsonl(tmp_path / "e.jsonl", [{"input": text}]))
    assert idx.overlap(text) == 1.0 and idx.overlap("nothing like it at all in here") == 0.0
    short = gen.EvalIndex(write_jsonl(tmp_path / "s.jsonl", [{"input": "He go home."}]))
    assert short.overlap("he go HOME") == 1.0 and short.overlap("go") == 0.0  # whole text only
    assert short.overlap("he go HOME", short=False) == 0.0  # answers: a short one leaks nothing
    half = " ".join(f"word{i}" for i in range(30)) + " " + " ".join(f"new{i}" for i in range(30))
    assert 0.3 < idx.overlap(half) < 0.5


def test_validators():
    task = get_task("summarize")
    row = {"dialogue": "#Person1#: I lost my keys at the station this morning.\n#Person2#: "
                       "Go to the lost and found office."}
    assert gen.validate(task, row, "  ") == "empty"
    assert gen.validate(task, row, "Summarize the following conversation: keys") == "template_leak"
    assert gen.validate(task, row, row["dialogue"] + " more") == "not_shorter"
    assert gen.validate(task, row, "I lost my keys at the station this") == "copy"
    assert gen.validate(task, row, "Person1 lost keys; Person2 suggests lost and found.") is None
    grammar = get_task("grammar")
    src = {"input": "He have three cat and two dogs."}
    assert gen.validate(grammar, src, "He has three cats and two dogs.") is None
    assert gen.validate(grammar, src, "The weather is lovely in spring, isn't it?") == "not_close"
    assert gen.yes_share([(1, " Yes", -0.1), (2, "no", -2.4), (3, "maybe", -1.0)]) == pytest.approx(
        0.9048 / (0.9048 + 0.0907), abs=1e-3)
    assert gen.yes_share([(1, "maybe", -1.0)]) is None


def completion(text: str, finish_reason: str = "stop"):
    from slmkit.backends import Completion

    return Completion(text, finish_reason, prompt_tokens=10, completion_tokens=len(text.split()))


def test_candidates_keep_valid_distinct_answers_scored_against_the_reference():
    task = get_task("summarize")
    row = {"dialogue": "#Person1#: I lost my keys at the station this morning.\n#Person2#: "
                       "Go to the lost and found office.", "summary": "A traveller misplaced keys and is sent to an office."}
    item = gen.Item("k", row, "in.jsonl:1")
    good = "A traveller misplaced keys and is sent to an office."
    group = gen.candidates(task, item, [completion(good), completion(" " + good + " "), completion(""),
                                        completion("anything", "error"), completion("Keys were lost.")])
    assert [c.text for c in group.valid] == [good, "Keys were lost."]
    assert group.rejected == {"same_as_other_candidate": 1, "empty": 1, "teacher_error": 1}
    assert group.valid[0].scores == {"reference": pytest.approx(1.0)}
    assert 0 < group.valid[1].scores["reference"] < 1


def test_keep_best_takes_the_highest_combined_score_and_drops_below_threshold():
    task = get_task("summarize")
    cfg = gen.GenerateConfig(teacher="t", task="summarize", out="o.jsonl", threshold=0.5)
    item = gen.Item("k", {"dialogue": "#Person1#: hi\n#Person2#: hello"}, "in.jsonl:1")
    cands = [gen.Candidate(completion("a"), {"reference": 0.9, "judge": 0.1}),   # 0.5
             gen.Candidate(completion("b"), {"reference": 0.4, "judge": 0.8}),   # 0.6
             gen.Candidate(completion("c"), {"reference": None, "judge": None})]
    best = gen.keep_best(gen.Candidates(item, cands, Counter()), task, cfg, None, gen.NearDup(1.0))
    assert best.text == "b" and best.score == pytest.approx(0.6)
    weak = [gen.Candidate(completion("d"), {"judge": 0.3}),
            gen.Candidate(completion("e"), {"reference": 0.4, "judge": 0.5})]   # 0.45 < 0.5
    low = gen.keep_best(gen.Candidates(item, weak, Counter()), task, cfg, None, gen.NearDup(1.0))
    assert low == gen.Drop("below_threshold", {"score": 0.45})
    none = gen.keep_best(gen.Candidates(item, [], Counter(empty=2)), task, cfg, None, gen.NearDup(1.0))
    assert none == gen.Drop("no_valid_candidate", {"candidates": {"empty": 2}})
    row = gen.kept_row(task, cfg, gen.Candidates(item, cands, Counter(empty=1)), best)
    assert row["summary"] == "b" and row["split"] == "train" and row["id"] == "k"
    assert row["meta"]["score"] == 0.6 and row["meta"]["candidates"] == 3
    assert row["meta"]["reasons"] == {"empty": 1}


def test_topics_self_instruct(cli, tiny_llama, tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("# seed topics\nbooking a table\nlost luggage\n")
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli("generate", "--teacher", tiny_llama, "--task", "reply", "--topics", topics,
                            "--out", out, "--inputs-per-topic", 2, "-n", 1, "--max-new-tokens", 6,
                            "--threshold", 0, "--no-judge", "--json")
    assert code == 0, err
    written = read_jsonl(gen.side_path(out, "inputs"))
    assert [w["id"] for w in written] == ["topic0-0", "topic0-1", "topic1-0", "topic1-1"]
    assert {w["topic"] for w in written} == {"booking a table", "lost luggage"}
    stats = json.loads(stdout)
    assert stats["inputs"] == sum(not w["unusable"] for w in written)
    for r in read_jsonl(out):
        assert r["id"].startswith("topic") and isinstance(r["message"], str) and "reply" in r


def test_bad_input_exits_2_before_generation(cli, tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "dialogue": "fine"}\n{"id": 2, "text": "no dialogue"}\n')
    out = tmp_path / "out.jsonl"
    code, _, err = cli("generate", "--teacher", "no/such/model", "--task", "summarize",
                       "--inputs", bad, "--out", out)
    assert code == 2 and f"{bad}:2" in err and "`dialogue`" in err and "Traceback" not in err
    bad.write_text('{"id": 1, "dialogue": "fine"}\n{"id": 2, "dialogue": \n')
    code, _, err = cli("generate", "--teacher", tiny_llama, "--task", "summarize", "--inputs", bad, "--out", out)
    assert code == 2 and f"{bad}:2" in err
    code, _, err = cli("generate", "--teacher", tiny_llama, "--task", "summarize", "--inputs", bad,
                       "--out", out, "--threshold", 2)
    assert code == 2 and "--threshold" in err
    assert not out.exists()


def test_generate_out_folder_is_refused_before_the_teacher_loads(cli, tmp_path, tiny_llama,
                                                                 monkeypatch):
    monkeypatch.setattr("slmkit.generate.teacher_backend", lambda cfg: pytest.fail("teacher loaded"))
    (tmp_path / "in.jsonl").write_text('{"dialogue": "A: hi\\nB: hello"}\n')
    (tmp_path / "data").mkdir()
    code, _, err = cli("generate", "--teacher", tiny_llama, "--task", "summarize",
                       "--inputs", tmp_path / "in.jsonl", "--out", tmp_path / "data")
    assert code == 2 and "data` is a folder" in err and "train.jsonl" in err and "Traceback" not in err

def test_unreachable_endpoint_keeps_what_was_written(cli, inputs, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "d0", "dialogue": "x", "summary": "y"}\n')
    code, _, err = cli("generate", "--teacher", f"openai:m@http://127.0.0.1:{port}/v1", "--task",
                       "summarize", "--inputs", inputs, "--out", out, "--retries", 1, "--no-judge")
    assert code == 2 and f"127.0.0.1:{port}" in err and "2 tries" in err
    assert out.read_text() == '{"id": "d0", "dialogue": "x", "summary": "y"}\n'
    code, _, err = cli("generate", "--teacher", "openai:nourl", "--task", "summarize", "--out", out)
    assert code == 2 and "openai:NAME@URL" in err


def test_openai_backend_against_slm_serve(cli, long_llama, inputs, tmp_path, monkeypatch):
    tiny_llama = long_llama
    serve = pytest.importorskip("slmkit.serve")
    monkeypatch.setenv("SLM_API_KEY", "s3cret")
    with serve.start_server([str(tiny_llama)], names=["tiny"], api_key="s3cret") as server:
        from slmkit.backends.openai import OpenAIBackend

        backend = OpenAIBackend.from_spec(f"openai:tiny@{server.url}", concurrency=4)
        comps = backend.generate([[{"role": "user", "content": "hi"}]] * 3, max_tokens=5,
                                 temperature=0.8, seed=3, n=2, logprobs=3)
        assert len(comps) == 6 and all(c.completion_tokens >= 1 for c in comps)
        assert all(c.logprobs and len(c.logprobs[0].top) == 3 for c in comps)
        assert comps[0].text == comps[2].text  # same prompt, same seed: same sample

        out = tmp_path / "out.jsonl"
        code, stdout, err = cli(*common(f"openai:tiny@{server.url}", inputs, out, "-n", 2,
                                        "--topk-logprobs", 3, "--tokenizer", tiny_llama, "--json"))
        assert code == 0, err
        stats = json.loads(stdout)
        rows = read_jsonl(out)
        assert stats["kept"] == len(rows) > 0 and stats["judge"] == "P(Yes)"
        assert rows[0]["meta"]["teacher"] == f"openai:tiny@{server.url}"
        assert rows[0]["teacher_topk"]["token_ids"] is None and stats["topk_lines"] == len(rows)

    monkeypatch.setenv("SLM_API_KEY", "wrong")
    with serve.start_server([str(tiny_llama)], names=["tiny"], api_key="s3cret") as server:
        code, _, err = cli(*common(f"openai:tiny@{server.url}", inputs, tmp_path / "o2.jsonl"))
        assert code == 2 and "SLM_API_KEY" in err


def test_server_without_logprobs_continue_or_stop(cli, long_llama, inputs, tmp_path):
    """A real `slm serve` whose model backend reports no log-probs (as many llama.cpp / Ollama
    builds do): --on-missing-logprobs stop exits 2 saying so; continue writes the data without
    them and judges by a 1-5 rating."""
    serve = pytest.importorskip("slmkit.serve")
    from slmkit.backends.hf import HFBackend

    class NoLogprobs(HFBackend):
        def run(self, requests):
            comps = super().run(requests)
            for c in comps:
                c.logprobs = None
            return comps

    with serve.start_server([NoLogprobs(str(long_llama), name="nolp")]) as server:
        teacher = f"openai:nolp@{server.url}"
        more = ("-n", 1, "--topk-logprobs", 3, "--tokenizer", long_llama)
        code, _, err = cli(*common(teacher, inputs, tmp_path / "a.jsonl", *more, "--on-missing-logprobs", "stop"))
        assert code == 2 and "no log-probs" in err
        assert not (tmp_path / "a.jsonl").exists()
        code, stdout, err = cli(*common(teacher, inputs, tmp_path / "b.jsonl", *more, "--json"))
        assert code == 0 and "no log-probs" in err
        stats = json.loads(stdout)
        assert stats["judge"] == "rating 1-5" and stats["topk_cache"] is None
        assert all("teacher_topk" not in r for r in read_jsonl(tmp_path / "b.jsonl"))


def test_keep_best_drops_answers_that_copy_an_eval_text_but_keeps_stock_short_ones(tmp_path):
    """A teacher answer that repeats an eval reference is contaminated; a short stock answer that
    equals one ("The passage does not say.") is not: it carries no eval example."""
    task = get_task("qa")
    cfg = gen.GenerateConfig(teacher="t", task="qa", out="o.jsonl", threshold=0.0)
    long_ref = "Take one tablet every six hours with water and never more than three a day."
    evals = gen.EvalIndex(write_jsonl(tmp_path / "e.jsonl", [
        {"passage": "p", "question": "q1", "answer": "The passage does not say."},
        {"passage": "p", "question": "q2", "answer": long_ref}]))
    item = gen.Item("k", {"passage": "Some other leaflet.", "question": "How often?"}, "in.jsonl:1")

    def best(text):
        group = gen.Candidates(item, [gen.Candidate(completion(text), {"reference": None, "judge": None})],
                               Counter())
        return gen.keep_best(group, task, cfg, evals, gen.NearDup(1.0))

    assert best("The passage does not say.").text == "The passage does not say."
    assert best(long_ref) == gen.Drop("contaminated_output")
