"""The README's commands are tests, and so are those of docs/: every `slm ...` line of their
fenced blocks (continuation lines joined) runs through `slmkit.cli.main` on the tiny fixtures and
must exit 0 and write what it says it writes. A fenced block whose first line is `# NAME.yaml` is
a file the reader saves: it is written to the reader's folder (budgets shrunk, RECIPE_SHRINK)
before the commands run, so `slm build NAME.yaml` builds the README's own recipe. A command added to the README runs here by default; the few that cannot run
in a test are listed in SKIP with the reason, one that fails on a known bug in KNOWN_BUGS, and an
entry of either that the README no longer has fails. `slm serve` runs in a thread until its
server answers /health, then is closed; `slm chat` reads one message and /exit from stdin.

The commands run in order (README.md, then docs/*.md by name; the generated pages have none) in
one folder, as a reader would type them: `slm prune ... --out pruned` makes the `pruned` that
`slm distill --student pruned` reads. The names a reader brings (`default`, `teacher`,
`train.jsonl`, `student.q8_0.gguf`) are made there up front
from the tiny model and a few lines of data; budgets shrink through flags added to each verb
(SHRINK) or dropped (DROP), and shape arguments sized for SmolLM2-135M are scaled to the tiny
model (SCALED). The module takes ~30 s on 2 cores; run it whole, since later commands read what
earlier ones wrote.
"""

from __future__ import annotations

import io
import json
import queue
import re
import shlex
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

from conftest import CORPUS, make_tiny_model, run_cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the pages whose commands run: the README, then the hand-written docs (cli.md and
# architectures.md are generated from the code and hold no commands to run)
GENERATED = {"cli.md", "architectures.md"}
PAGES = [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in GENERATED)

# README command (its text before any `#` comment) -> why it does not run here
SKIP = {
    "slm info Qwen/Qwen2.5-0.5B-Instruct": "a Hub id is read from the local Hugging Face cache, "
                                           "which a test does not have (nothing downloads)",
    "slm info qwen2.5-coder-0.5b-instruct": "a packaged model, installed by `make models` "
                                            "(~0.5 GB), which tests never need",
    "SLMKIT_DATA=~/datasets slm build recipes/dialogsum.yaml": "DialogSum is not shipped, and the "
        "recipe runs SmolLM2-135M for ~25 min (test_recipe_data.py loads it from $SLMKIT_DATA)",
    "SLMKIT_DATA=~/datasets slm build recipes/grammar-big-teacher.yaml": "JFLEG is not shipped, "
        "and the 1.5B teacher runs for ~20 min (test_big_teacher.py runs the road on a tiny GGUF)",
    "SLMKIT_DATA=~/datasets slm build recipes/dialogsum-big-teacher.yaml": "DialogSum is not "
        "shipped, and the 1.5B teacher is tuned and runs for ~40 min (test_big_teacher.py runs "
        "the road on a tiny GGUF)",
}

# README command -> the src bug that makes it fail today (xfail, strict: fixed, it must leave here)
KNOWN_BUGS: dict[str, str] = {}

# flags appended to every command of a verb (argparse: the last value wins)
SHRINK = {
    # depth only: the tiny model's 32-wide rows cut in width are not whole 32-value q8_0 blocks,
    # and transformers cannot load such a GGUF back (eval of serving-and-export.md's exports);
    # real widths stay on prune's grid of 32
    "prune": ["--num-samples", "4", "--seq-len", "32", "--method", "depth"],
    "distill": ["--max-steps", "1", "--batch-size", "2", "--max-length", "96", "--eval-max", "2"],
    "eval": ["--limit", "2", "--max-new-tokens", "4", "--cot-tokens", "4"],
    # --threshold 0: a random teacher's answers score ~0 against the references and as judge
    "generate": ["--limit", "2", "--max-new-tokens", "4", "--inputs-per-topic", "1", "--threshold", "0"],
    "chat": ["--max-tokens", "4"],
    "serve": ["--port", "0"],
}
# flags dropped, with the reason: the tests that do run them
DROP = {"--speed": "times each model in a child process, 10-20 s a model here; test_speed.py "
                   "and test_evaluate.py run it"}
# (flag, README value) -> value for the tiny model (4 layers, MLP 64, ~50K parameters)
SCALED = {("--target", "60M"): "35K", ("--layers", "24"): "2", ("--ffn", "1024"): "32"}
# a recipe block's stage options -> the tiny budget (the rest of the recipe runs as written)
RECIPE_SHRINK = {
    "tune_teacher": {"max_steps": 2, "batch_size": 2, "max_length": 96, "eval_max": 2},
    "distill": {"max_steps": 2, "batch_size": 2, "max_length": 96, "eval_max": 2},
    "prune": {"num_samples": 4, "seq_len": 32},
    "generate": {"limit": 2, "max_new_tokens": 4}, "label": {"limit": 2, "max_new_tokens": 4},
    "eval": {"limit": 2, "max_new_tokens": 4, "speed": False},
}
# model folders and GGUF files the pages name as inputs, made from the tiny llama
MODEL_DIRS = ("models/default", "student", "teacher")
GGUF_FILES = ("student.q8_0.gguf",)
# what `--out` holds after each verb
OUT_FILES = {"prune": ["prune_plan.json", "config.json"],
             "distill": ["training_record.json", "config.json"],
             "eval": ["metrics.json", "report.html", "report.md"]}


def fenced_blocks(page: Path) -> list[str]:
    return re.findall(r"^ *```[^\n]*\n(.*?)^ *```", page.read_text(), re.S | re.M)


def readme_commands() -> list[tuple[str, str]]:
    """(page:block number, line) of every `slm` command of the pages, in order."""
    found = []
    for page in PAGES:
        for i, block in enumerate(fenced_blocks(page)):
            found += [(f"{page.name}:{i}", line) for line in block_commands(block)]
    return found


def block_commands(block: str) -> list[str]:
    """The `slm` lines of one fenced block (continuation lines joined, `$ ` and VAR= dropped)."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = " ".join(line.split()).removeprefix("$ ")
        words = [w for w in line.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        if words[:1] == ["slm"] or "-m slmkit" in line:
            found.append(line)
    return found


def saved_files() -> dict[str, str]:
    """NAME.yaml -> text, for each fenced block of the pages that starts with `# NAME.yaml`."""
    files = {}
    for page in PAGES:
        for block in fenced_blocks(page):
            first = block.split("\n", 1)[0].strip()
            if re.fullmatch(r"# [\w.-]+\.yaml", first):
                files[first[2:]] = block
    return files


def key(line: str) -> str:
    return line.split(" #")[0].strip()


COMMANDS = readme_commands()


def test_the_pages_have_commands_and_every_skip_is_one_of_them():
    keys = [key(line) for _, line in COMMANDS]
    assert len(keys) >= 20 and "slm info default" in keys  # the block parser still finds them
    assert {block.split(":")[0] for block, _ in COMMANDS} >= {"README.md", "serving-and-export.md"}
    assert [k for k in (*SKIP, *KNOWN_BUGS) if k not in keys] == []


def test_the_readme_recipe_is_saved_and_built():
    assert "slm build mine.yaml" in [key(line) for _, line in COMMANDS]
    assert "mine.yaml" in saved_files()


# --------------------------------------------------------------------------- the reader's folder

def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _dialogues(n: int, split: bool = False):
    rows = []
    for i in range(n):
        row = {"id": f"d{i}", "dialogue": f"#Person1#: Can you send me report {i}?\n#Person2#: "
                                          "Yes, before the meeting tomorrow morning.",
               "summary": f"Person2 will send report {i} before the meeting."}
        if split:
            row["split"] = "eval" if i % 4 == 0 else "train"
        rows.append(row)
    return rows


def make_workspace(root: Path) -> Path:
    """root/main is the reader's folder."""
    from slmkit.export import export_gguf

    cwd = root / "main"
    cwd.mkdir()
    tiny = make_tiny_model("llama", root / "tiny")
    # the presets' conversations are longer than the fixture's 128 positions (rotary: no weights
    # depend on it); SmolLM2 has 8192
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    for name in MODEL_DIRS:
        shutil.copytree(tiny, cwd / name)
    for name in GGUF_FILES:
        export_gguf(tiny, cwd / name, "q8_0")
    _jsonl(cwd / "train.jsonl", _dialogues(8, split=True))
    _jsonl(cwd / "data.jsonl", _dialogues(8))
    _jsonl(cwd / "dialogues.jsonl", [{k: r[k] for k in ("id", "dialogue")} for r in _dialogues(3)])
    _jsonl(cwd / "eval.jsonl", _dialogues(12)[9:])
    import yaml

    for name, text in saved_files().items():  # the recipes a reader saves, on a tiny budget
        recipe = yaml.safe_load(text)
        for stage, opts in (recipe.get("stages") or {}).items():
            recipe["stages"][stage] = (opts or {}) | RECIPE_SHRINK.get(stage, {})
        (cwd / name).write_text(yaml.safe_dump(recipe, sort_keys=False))
    _jsonl(cwd / "arc.jsonl", [{"question": f"Which word comes {i}?", "choices": ["cat", "dog", "sun"],
                                "gold": i % 3, "group": "ab"[i % 2]} for i in range(7)])
    _jsonl(cwd / "gsm.jsonl", [{"question": f"Tom has {i} apples and buys 1. How many?",
                                "answer": str(i + 1), "type": "gen", "rationale": f"{i} + 1 = {i + 1}."}
                               for i in range(5)])
    (cwd / "toxigen.json").write_text(json.dumps([
        {"text": CORPUS[i % len(CORPUS)], "toxicity_score": 1 + i % 5,
         "label": "hate" if i % 2 else "neutral", "target_groups": ["group a" if i < 8 else "group b"]}
        for i in range(16)]))
    (cwd / "wiki.txt").write_text(" ".join(CORPUS))
    (cwd / "topics.txt").write_text("weekend plans\na visit to the dentist\n")
    return cwd


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The reader's folder, and the servers the README starts in the background or assumes."""
    from slmkit.serve import start_server

    cwd = make_workspace(tmp_path_factory.mktemp("readme"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("SLM_API_KEY", raising=False)
        # `slm distill --teacher openai:teacher@http://HOST:8000`: a teacher served somewhere
        teacher = start_server(["teacher"], port=0)
        ws = {"cwd": cwd, "urls": {"http://HOST:8000": teacher.url}, "background": []}
        yield ws
        teacher.close()
        for server, thread in ws["background"]:
            server.close()
            thread.join(timeout=30)


# --------------------------------------------------------------------------- running one command

def expand(block: int, line: str) -> list[list[str]]:
    """The argv lists one line stands for: `slm distill ... --resume` borrows the flags of the
    block's nearest full `slm distill` above it that it does not set itself, and `--quant Q ...
    # Q = a, b` runs once per value."""
    words = shlex.split(line, comments=True)
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    if "..." in words:
        verb = words[:2]
        above = COMMANDS[:COMMANDS.index((block, line))]
        full = next(shlex.split(other, comments=True) for b, other in reversed(above)
                    if b == block and shlex.split(other, comments=True)[:2] == verb
                    and "..." not in other)
        given = {w for w in words if w.startswith("-")}
        borrowed, take = [], False
        for w in full[2:]:
            take = (w not in given) if w.startswith("-") else take
            if take:
                borrowed.append(w)
        i = words.index("...")
        words = words[:i] + borrowed + words[i + 1:]
    placeholder = re.search(r"# (\w+) = ([\w, ]+)$", line)
    if not placeholder:
        return [words]
    name, values = placeholder[1], [v.strip() for v in placeholder[2].split(",")]
    return [[re.sub(rf"\b{name}\b", v, w) for w in words] for v in values]


def test_expand_borrows_flags_and_placeholders():
    distill = [(b, line) for b, line in COMMANDS if line.startswith("slm distill ... --resume")]
    assert distill, "the README's `slm distill ... --resume` line is gone: update this test"
    (argv,) = expand(*distill[0])
    assert argv[-1] == "--resume" and "--student" in argv and "--out" in argv and "..." not in argv
    # the nearest full `slm distill` above it (the student's), not the block's first (the tuning)
    assert flag(argv, "--out") == "student" and flag(argv, "--teacher") == "teacher_tuned"
    quants = [c for c in COMMANDS if "--quant Q" in c[1]]
    assert [a[a.index("--quant") + 1] for a in expand(*quants[0])] == ["q8_0", "q4_k_m", "q5_k_m"]


def tiny_argv(words: list[str], urls: dict) -> list[str]:
    verb, args = words[1], words[2:]
    out = []
    for i, w in enumerate(args):
        if w in DROP:
            continue
        if w == "default":  # the embedded SmolLM2; a folder named `default` is served under that name
            w = "models/default"
        w = SCALED.get((args[i - 1] if i else None, w), w)
        for url, real in urls.items():
            w = w.replace(url, real)
        out.append(w)
    return [verb, *out, *SHRINK.get(verb, [])]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def serve(argv: list[str]):
    """`slm serve ...` in a thread until its server answers; returns (server, thread, [exit code
    once the thread ends])."""
    from slmkit import cli, serve as serve_mod

    started, codes = queue.Queue(), []
    init = serve_mod.Server.__init__

    def spy(self, *a, **kw):  # the running server, to ask and to close
        init(self, *a, **kw)
        started.put(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve_mod.Server, "__init__", spy)
        thread = threading.Thread(target=lambda: codes.append(cli.main(argv)), daemon=True)
        thread.start()
        while thread.is_alive():
            try:
                server = started.get(timeout=0.1)
                break
            except queue.Empty:
                pass
        else:
            pytest.fail(f"`slm {' '.join(argv)}` exited {codes} before serving")
    with urllib.request.urlopen(server.url + "/health") as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    return server, thread, codes


def check_outputs(argv: list[str], stdout: str) -> None:
    verb, out = argv[0], flag(argv, "--out")
    if verb == "info":
        assert "architecture" in stdout and "parameters" in stdout
    if out is None or "--dry-run" in argv:
        return
    assert Path(out).exists(), f"`slm {' '.join(argv)}` did not write {out}"
    for name in OUT_FILES.get(verb, []):
        assert (Path(out) / name).is_file(), f"{out}/{name} missing"
    if verb == "export":
        assert Path(out).read_bytes()[:4] == b"GGUF"
        assert any(f"FROM ./{Path(out).name}\n" in m.read_text() for m in Path(out).parent.glob("*Modelfile"))
    if verb == "generate":  # --limit 2 inputs, each kept (--threshold 0)
        assert len(Path(out).read_text().splitlines()) == 2
        if "--topk-logprobs" in argv:
            assert Path(out).with_suffix(".topk.safetensors").is_file()


@pytest.mark.parametrize("block, line", COMMANDS,
                         ids=[f"{b.split(':')[0]}: {key(line)}" for b, line in COMMANDS])
def test_readme_command(block, line, workspace, monkeypatch, request):
    if key(line) in SKIP:
        pytest.skip(SKIP[key(line)])
    if key(line) in KNOWN_BUGS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_BUGS[key(line)], strict=True))
    monkeypatch.chdir(workspace["cwd"])
    for var in re.findall(r"(?:^| )([A-Z_]+)=(\S*) ", line):
        monkeypatch.setenv(*var)
    for words in expand(block, line):
        background = words[-1] == "&"  # `slm serve ... &`: later commands of the block talk to it
        argv = tiny_argv(words[:-1] if background else words, workspace["urls"])
        if argv[0] == "serve":
            server, thread, codes = serve(argv)
            if background:  # `slm serve ... &`: later commands of the block talk to it
                workspace["background"].append((server, thread))
                workspace["urls"][f"http://127.0.0.1:{flag(words, '--port') or 8000}"] = server.url
                continue
            server.close()
            thread.join(timeout=30)
            assert codes == [0]
            continue
        if argv[0] == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/exit\n"))
        code, stdout, stderr = run_cli(*argv)
        assert code == 0, f"`slm {' '.join(argv)}` exited {code}:\n{stderr[-3000:]}"
        check_outputs(argv, stdout)
