"""Bad input in any verb is one line on stderr and exit 2, before any work (issue 13): non-UTF-8
files, broken model folders, impossible flag values, mistyped recipe options; and a reader that
closes stdout early ends the command quietly."""

import errno
import json
import shutil
import struct
import subprocess
import sys

import pytest

from slmkit import models

GOOD_LINE = b'{"dialogue": "fine", "summary": "ok"}\n'
BAD_BYTES = b'{"dialogue": "caf\xe9 au lait", "summary": "ok"}\n'  # latin-1, not UTF-8


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def latin1(tmp_path):
    """The same non-UTF-8 line as .jsonl and .txt, and a recipe with such a byte in a comment."""
    (tmp_path / "bad.jsonl").write_bytes(GOOD_LINE + BAD_BYTES)
    (tmp_path / "bad.txt").write_bytes(b"first paragraph\n\nsecond \xff paragraph\n")
    (tmp_path / "bad.yaml").write_bytes(b"teacher: default\ntask: summarize\n# caf\xe9\n"
                                        b"stages: {prune: {target: 0.5}}\n")
    (tmp_path / "topics.txt").write_bytes(b"cooking\nthe caf\xe9\n")
    return tmp_path


def test_non_utf8_files_name_file_line_and_offset(cli, latin1, tiny_llama):
    t = latin1
    jsonl = ("bad.jsonl:2: not UTF-8 text", f"offset {len(GOOD_LINE) + BAD_BYTES.index(0xe9)}")
    cases = [
        (["prune", tiny_llama, "--target", "0.5", "--calib", t / "bad.jsonl", "--dry-run"], jsonl),
        (["prune", tiny_llama, "--target", "0.5", "--calib", t / "bad.txt", "--dry-run"],
         ("bad.txt:3: not UTF-8 text", "byte 0xff")),
        (["eval", tiny_llama, "--ppl", t / "bad.txt"], ("bad.txt:3: not UTF-8",)),
        (["eval", tiny_llama, "--task", "summarize", "--data", t / "bad.jsonl"], jsonl),
        (["distill", "--student", tiny_llama, "--data", t / "bad.jsonl", "--out", t / "s",
          "--alpha-ce", "1"], jsonl),
        (["generate", "--teacher", tiny_llama, "--task", "summarize", "--inputs", t / "bad.jsonl",
          "--out", t / "o.jsonl"], jsonl),
        (["generate", "--teacher", tiny_llama, "--task", "summarize", "--topics", t / "topics.txt",
          "--out", t / "o.jsonl"], ("topics.txt:2: not UTF-8",)),
        (["build", t / "bad.yaml", "--runs", t / "runs"], ("bad.yaml:3: not UTF-8",)),
    ]
    for args, needles in cases:
        one_line_error(*cli(*args)[::2], *needles)
    assert not (t / "runs").exists() and not (t / "o.jsonl").exists()


def test_generate_resume_file_that_is_not_utf8_is_left_alone(cli, latin1, tiny_llama):
    out = latin1 / "out.jsonl"
    out.write_bytes(BAD_BYTES + b'{"torn')
    (latin1 / "in.jsonl").write_text('{"dialogue": "A: hi\\nB: hello"}\n')
    code, _, err = cli("generate", "--teacher", tiny_llama, "--task", "summarize",
                       "--inputs", latin1 / "in.jsonl", "--out", out)
    one_line_error(code, err, "out.jsonl:1: not UTF-8")
    assert out.read_bytes() == BAD_BYTES + b'{"torn'  # not cut: we refused it


def broken_copy(tiny_llama, folder, name, content: bytes):
    shutil.copytree(tiny_llama, folder)
    (folder / name).write_bytes(content)
    return folder


def test_broken_model_folders(cli, tmp_path, tiny_llama):
    cfg = (tiny_llama / "config.json").read_bytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()  # no data_offsets
    cases = [
        ("config.json", b"[1, 2]", "config.json: expected a JSON object, got list"),
        ("config.json", cfg.replace(b'"llama"', b'"ll\xe1ma"'), "config.json:"),
        ("tokenizer_config.json", b"{not json", "tokenizer_config.json:1: not valid JSON"),
        ("tokenizer_config.json", b'["chat_template"]', "tokenizer_config.json: expected a JSON object"),
        ("model.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 4,
         "tensor `w` has no valid dtype/shape/data_offsets"),
        ("model.safetensors", struct.pack("<Q", 2) + b"[]", "not a valid safetensors file"),
    ]
    for i, (name, content, needle) in enumerate(cases):
        folder = broken_copy(tiny_llama, tmp_path / f"case{i}", name, content)
        for verb in (["info", folder], ["prune", folder, "--target", "0.5", "--dry-run",
                                        "--task", "summarize"]):
            one_line_error(*cli(*verb)[::2], needle)


@pytest.mark.parametrize("target", ["nan", "inf", "=-inf", "NaN"])
def test_prune_target_must_be_finite(cli, tiny_llama, target):
    flag = ["--target" + target] if target.startswith("=") else ["--target", target]
    code, _, err = cli("prune", tiny_llama, *flag, "--dry-run", "--task", "summarize")
    one_line_error(code, err, "give a finite number")


def test_prune_unreachable_target_suggests_other_methods(cli, tiny_llama):
    code, _, err = cli("prune", tiny_llama, "--target", "2", "--dry-run", "--task", "summarize")
    one_line_error(code, err, "--method both;", "--method depth or --method width")
    assert "use --method both" not in err  # the method already chosen


@pytest.mark.parametrize("args", [
    ["eval", "M", "--task", "summarize", "--batch-size", "0"],
    ["eval", "M", "--task", "summarize", "--max-new-tokens", "0"],
    ["eval", "M", "--task", "summarize", "--max-new-tokens", "-5"],
    ["generate", "--teacher", "M", "--task", "summarize", "--out", "o.jsonl", "--batch-size", "0"],
    ["generate", "--teacher", "M", "--task", "summarize", "--out", "o.jsonl", "--max-new-tokens", "-5"],
    ["chat", "M", "--max-tokens", "0"],
    ["serve", "M", "--max-tokens", "-5"],
])
def test_counts_below_one_exit_2_before_loading(cli, tiny_llama, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "load_folder", lambda *a, **k: pytest.fail("model loaded"))
    flag, value = args[-2:]
    code, _, err = cli(*[str(tiny_llama) if a == "M" else a for a in args])
    one_line_error(code, err, f"{flag} {value}")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["distill", "--student", "M", "--data", "d.jsonl", "--out", "o", "--alpha-ce", "1",
      "--clip", "0"], "--clip 0.0: must be positive"),
    (["distill", "--student", "M", "--data", "d.jsonl", "--out", "o", "--alpha-ce", "1.5"],
     "--alpha-ce 1.5: must be between 0 and 1"),
    (["generate", "--teacher", "M", "--task", "qa", "--out", "o.jsonl", "-n", "0"], "-n 0: must be at least 1"),
    (["generate", "--teacher", "M", "--task", "qa", "--out", "o.jsonl", "--threshold", "2"],
     "--threshold 2.0: must be between 0 and 1"),
    (["prune", "M", "--target", "0.5", "--dry-run", "--seq-len", "1"], "--seq-len 1: must be at least 2"),
])
def test_option_ranges_name_the_flag_and_value(cli, tiny_llama, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*[str(tiny_llama) if a == "M" else a for a in args])
    one_line_error(code, err, message)


def test_misleading_messages(cli, tmp_path, tiny_llama):
    code, _, err = cli("eval", tiny_llama, "--ppl", tmp_path / "missing.txt")
    one_line_error(code, err, "missing.txt` does not exist")
    assert "calibration" not in err
    (tmp_path / "folder").mkdir()
    for args in (["eval", tiny_llama, "--task", "summarize", "--data", tmp_path / "folder"],
                 ["prune", tiny_llama, "--target", "0.5", "--calib", tmp_path / "folder", "--dry-run"],
                 ["generate", "--teacher", tiny_llama, "--task", "summarize",
                  "--inputs", tmp_path / "folder", "--out", tmp_path / "o.jsonl"]):
        code, _, err = cli(*args)
        one_line_error(code, err, "folder` is a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: default\ntask: summarize\ndata: folder\nstages: {prune: {}}\n")
    one_line_error(*cli("build", recipe)[::2], "r.yaml:3: data: `folder` is a folder")


# --------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("stages, line, message", [
    ("distill: {max_steps: fast}", 5, "stages.distill.max_steps: expected an integer, got 'fast'"),
    ("tune_teacher:\n    max_tokens: [1]", 6, "stages.tune_teacher.max_tokens: expected an integer"),
    ("prune: {shape: 5}", 5, "stages.prune.shape: expected a mapping, got 5"),
    ("eval: {limit: many}", 5, "stages.eval.limit: expected an integer, got 'many'"),
    ("eval: {bench: arc}", 5, "stages.eval.bench: expected a list"),
    ("generate: {topics: 3}", 5, "stages.generate.topics: expected text"),
    ("export: {quant: q2_k}", 5, "stages.export.quant: 'q2_k' is not one of f32, f16, q8_0"),
    ("prune: {target: 0.5, method: deep}", 5, "stages.prune.method: 'deep' is not one of"),
    # values only the stage's config refuses (its options' `check`), still at the key's line
    ("tune_teacher: {}\n  distill:\n    lr: 1.0e-4\n    edit_weight: 0", 8,
     "stages.distill.edit_weight: 0 must be positive"),
    ("prune: {target: 0.5, seq_len: 1}", 5, "stages.prune.seq_len: 1 must be at least 2"),
    ("label: {dedup_threshold: 0}", 5, "stages.label.dedup_threshold: 0 must be in (0, 1]"),
    ("eval: {max_new_tokens: 0}", 5, "stages.eval.max_new_tokens: 0 must be at least 1"),
])
def test_recipe_option_types_name_the_line_before_any_stage(cli, tmp_path, stages, line, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: x\nteacher: default\ntask: summarize\nstages:\n  {stages}\n")
    code, _, err = cli("build", path, "--runs", tmp_path / "runs")
    one_line_error(code, err, f"recipe.yaml:{line}: {message}")
    assert not (tmp_path / "runs").exists()


def test_recipe_empty_teacher(cli, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\nteacher:\ntask: summarize\nstages: {prune: {target: 0.5}}\n")
    one_line_error(*cli("build", path, "--runs", tmp_path / "runs")[::2],
                   "recipe.yaml:2: teacher: empty; give a MODEL")


def test_recipe_options_of_the_right_type_pass():
    from slmkit.recipe import _hint_ok, _stage_api

    hints = {k: h for k, (_, h) in _stage_api("prune").items()}
    assert _hint_ok(0.5, hints["target"]) and _hint_ok("60M", hints["target"])
    assert _hint_ok({"layers": 2}, hints["shape"]) and _hint_ok(None, hints["shape"])
    assert _hint_ok(["arc"], dict(_stage_api("eval"))["bench"][1])


# --------------------------------------------------------------------------- output

def test_info_into_a_closed_pipe_ends_quietly(tiny_llama):
    """`slm info X | head`: the reader goes away before we write."""
    p = subprocess.Popen([sys.executable, "-m", "slmkit", "info", str(tiny_llama)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_is_one_line_that_says_what_survives(cli, monkeypatch, tiny_llama, error):
    import slmkit.info

    def full(args):
        raise error

    monkeypatch.setattr(slmkit.info, "run", full)
    code, _, err = cli("info", tiny_llama)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no space left on the disk" in err and "rerun the same command" in err
