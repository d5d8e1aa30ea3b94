"""The CUDA checks of one lent GPU, in one run (`bash bench/gpu.sh` sets up and calls this):

    python bench/gpu.py                        # real shapes on CUDA (budget 450 s)
    python bench/gpu.py --quick --device cpu   # tiny shapes: proves the code paths on a CPU

Arms, in this order, each in its own process with its own timeout (a crash or hang in one leaves
the others; the tests come last and take what time is left):
  models   random-init teacher and student from Qwen2Config with the real shapes of
           Qwen2.5-1.5B-Instruct (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960) and
           Qwen2.5-0.5B-Instruct (896, 24, 14, 2, 4864, tied embeddings), vocabulary 151936,
           saved with save_pretrained; a tokenizer of 400 tokens made here (ids stay below the
           models' vocabulary, as Qwen's 151665 tokens do below its 151936 rows). Nothing downloads.
  distill  `slm distill` (its Python entry) teacher -> student, forward KL, bf16 autocast, batch x
  trl      length fixed (4 x 512: every example 496-512 tokens, none cut), N steps; then TRL's
           GKDTrainer (lmbda 0, beta 0: off-policy forward KL) on the same rows, batch, steps,
           length, learning rate and precision (models loaded as slmkit loads them: student float32,
           teacher bf16). tokens/s = tokens read / training time (first step included; `steady`
           leaves out the first step); peak memory = torch.cuda.max_memory_allocated of the
           process (peak RSS on a CPU). No activation checkpointing on either side.
  safety   slmkit's batched sentence perplexities (`slm eval --safety`'s path, batch `auto`)
           against a single-stream loop (one sentence per forward, SafeNLP's formula) on the same
           student (in the dtype `slm eval` holds it: bf16 on CUDA) and the same ~500
           ToxiGen-shaped sentences (bench/eval_speed.py makes them); items/s of each, the ratio,
           and the largest relative difference of the perplexities.
  tests    pytest on the test files whose code runs on CUDA (precision, losses, scoring, safety,
           distill, speed; `-m "not slow"`). Tests pick CUDA only where they leave the device to
           the default (most pin `cpu`), so this arm also runs `slm distill --device cuda` end to
           end on tiny models through the CLI.

Each arm prints one line; results/gpu/<YYYY-MM-DD>-<commit>-<machine>.json gets the date, commit,
machine (GPU, CUDA, torch, transformers, TRL, CPU), the numbers, and which arms ran or failed and
why; it is rewritten (temp file + rename) after every arm, so a run cut short keeps what it
measured. Exit status 1 when an arm failed or was skipped. Never called from the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench"), str(ROOT / "tests")]
from slmkit import results  # noqa: E402  (after the path above: the bench runs without an install)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ARMS = ("models", "distill", "trl", "safety", "tests")  # the measurements first: tests take what is left
# seconds each arm may take at most (real shapes); the whole run also stops at --budget
CAPS = {"models": 90, "tests": 150, "distill": 120, "trl": 120, "safety": 75}
TEST_FILES = ["tests/test_precision.py", "tests/test_losses.py", "tests/test_scoring.py",
              "tests/test_safety.py", "tests/test_distill.py", "tests/test_speed.py"]
QUICK_TEST_FILES = ["tests/test_precision.py", "tests/test_losses.py"]

# (hidden, layers, heads, KV heads, MLP, vocabulary, tied embeddings)
REAL = {"teacher": (1536, 28, 12, 2, 8960, 151936, True),    # Qwen2.5-1.5B-Instruct
        "student": (896, 24, 14, 2, 4864, 151936, True)}     # Qwen2.5-0.5B-Instruct
QUICK = {"teacher": (64, 4, 4, 2, 128, 512, True),
         "student": (32, 2, 4, 2, 64, 512, True)}
TINY = {"teacher": (32, 4, 4, 2, 64, 512, True), "student": (32, 2, 4, 2, 64, 512, True)}
WORDS = " ".join(
    "The patient should take one tablet twice a day with food. Summarize the conversation between "
    "the two friends about their weekend plans. Can you send me the report before the meeting "
    "tomorrow morning? The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
    "Thanks for your message! I will call you back after lunch.".split()).split()


# --------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few steps (a CPU proof run)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (30; quick 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step (4; quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row, at most (512; quick 128)")
    ap.add_argument("--sentences", type=int, default=None, help="safety sentences (500; quick 60)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole run")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--results", default=None, help="folder of the JSON (default results/gpu; with "
                    "--quick a temp folder: tiny shapes are no result)")
    ap.add_argument("--copy-to", default=None, help="also write the JSON here (e.g. $OUT)")
    ap.add_argument("--work", default=None, help="folder for models and data (default: a temp dir)")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm here
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (4 if q else 30)
    args.batch_size = args.batch_size or (2 if q else 4)
    args.seq_len = args.seq_len or (128 if q else 512)
    args.sentences = args.sentences or (60 if q else 500)
    if args.arm:
        return child(args)

    args.results = args.results or (Path(tempfile.gettempdir()) / "slmkit-gpu-quick" / "gpu" if q else ROOT / "results" / "gpu")
    start = time.monotonic()
    wanted = [a for a in args.arms.split(",") if a]
    bad = [a for a in wanted if a not in ARMS]
    if bad:
        print(f"bench/gpu.py: --arms {','.join(bad)}: choose from {','.join(ARMS)}", file=sys.stderr)
        return 2
    info = machine(args.device)
    if args.device.startswith("cuda") and not info["cuda_available"]:
        # `make bench` runs every bench/*.py: on a machine without a GPU this one has nothing to do
        print("bench/gpu.py: skipped, torch sees no CUDA device here (run `bash bench/gpu.sh` on a GPU "
              "machine; `--quick --device cpu` tries the code paths on a CPU)")
        return 0
    signal.signal(signal.SIGTERM, stop)  # bench/gpu.sh's overall timeout
    own_work = args.work is None  # ours to remove at the end (real shapes: ~5 GB of weights)
    work = Path(args.work or tempfile.mkdtemp(prefix="slmkit-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"bench": "gpu", "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "commit": commit(), "machine": info,
              "settings": {"quick": q, "device": args.device, "steps": args.steps,
                           "batch_size": args.batch_size, "seq_len": args.seq_len,
                           "sentences": args.sentences, "shapes": QUICK if q else REAL},
              "arms": {}, "ratios": {}, "seconds": 0.0}
    name = f"{report['date'][:10]}-{report['commit']}-{info['slug']}{'-quick' if q else ''}.json"
    path = Path(args.results) / name
    print(f"machine: {info['gpu'] or info['cpu']}; torch {info['torch']} (CUDA {info['cuda']}), "
          f"transformers {info['transformers']}, TRL {info['trl']}; commit {report['commit']}", flush=True)
    for arm in ARMS:
        if arm not in wanted:
            continue
        left = args.budget - (time.monotonic() - start)
        cap = CAPS[arm] * (2 if q else 1)  # a busy shared CPU
        why = skip_reason(arm, work, info)
        if why is None and left < 20:
            why = f"out of time ({args.budget:.0f} s budget)"
        if why:
            report["arms"][arm] = {"status": "skipped", "why": why}
            print(f"[{arm}] skipped: {why}", flush=True)
        else:
            report["arms"][arm] = run_arm(arm, args, work, min(cap, left))
            print(f"[{arm}] {summary(arm, report['arms'][arm])}", flush=True)
        report["seconds"] = round(time.monotonic() - start, 1)
        report["ratios"] = ratios(report["arms"])
        # results/gpu/<date>-<commit>-<machine>.json through the project's writer, after every
        # arm, so a run cut short keeps what it measured; the copy is what comes back from a device
        path = results.write("gpu", report, summary=summary_line(report),
                             root=Path(args.results).parent, commit_id=(report["commit"], False))
        if args.copy_to:
            write_json(Path(args.copy_to) / path.name, report)
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in report["ratios"].items():
        print(f"ratio {k}: {v:.2f}")
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    failed = [a for a, r in report["arms"].items() if r["status"] != "ok"]
    if failed:
        print(f"bench/gpu.py: not all arms ran: {', '.join(failed)} (see `why` in the JSON)")
    return 1 if failed else 0


def skip_reason(arm: str, work: Path, info: dict) -> str | None:
    if arm != "models" and not (work / "safety.json").exists():  # the models arm writes it last
        return f"no models in {work} (the models arm did not finish)"
    if arm == "trl" and info["trl"] is None:
        return "TRL is not importable (pip install trl==1.16.0, or carry its wheel: bench/gpu.sh --wheels)"
    if arm == "tests" and info["pytest"] is None:
        return "pytest is not importable"
    return None


RUNNING: subprocess.Popen | None = None  # the arm in progress, ended with us on SIGTERM


def stop(signum, frame):
    if RUNNING is not None:
        os.killpg(RUNNING.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_arm(arm: str, args, work: Path, timeout: float) -> dict:
    """Run one arm in a child process; its last stdout line `RESULT {json}` is the result."""
    global RUNNING
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--work", str(work),
           "--device", args.device, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--sentences", str(args.sentences)] + (["--quick"] if args.quick else [])
    t0 = time.monotonic()
    # its own process group (not session: the GPU machine ends a command's leftovers, but not
    # those of a new session), so a timeout also ends what it started (pytest, the CLI)
    RUNNING = p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=ROOT, process_group=0)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        return {"status": "timeout", "why": f"over its {timeout:.0f} s", "seconds": round(timeout, 1),
                "stderr_tail": stderr[-1500:]}
    finally:
        RUNNING = None
    seconds = round(time.monotonic() - t0, 1)
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        err = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "failed", "why": f"exit {p.returncode}: {err[:300]}", "seconds": seconds,
                "stderr_tail": stderr[-1500:]}
    out = json.loads(lines[-1][len("RESULT "):])
    return {"status": out.pop("status", "ok"), "seconds": seconds} | out


def summary(arm: str, r: dict) -> str:
    if r["status"] in ("timeout", "skipped") or (r["status"] == "failed" and arm != "tests"):
        return f"{r['status']}: {r.get('why', '')}"
    if arm == "models":
        return (f"teacher {r['teacher_params'] / 1e6:.2f}M, student {r['student_params'] / 1e6:.2f}M parameters, "
                f"{r['examples']} training rows ({r['seconds']:.0f} s)")
    if arm == "tests":
        return f"{r['status']}: pytest {r['pytest']['summary']}; CLI distill on {r['cli']['device']}: {r['cli']['status']}"
    if arm in ("distill", "trl"):
        return (f"{r['trainer']}: {r['tokens_per_s']:.0f} tokens/s ({r['steady_tokens_per_s']:.0f} steady), "
                f"peak {r['peak_gib']:.2f} GiB ({r['peak_kind']}), {r['steps']} steps x {r['batch_size']} rows, "
                f"{r['tokens']} tokens in {r['train_s']:.1f} s")
    if arm == "safety":
        return (f"batched {r['batched_items_per_s']:.1f} items/s, single-stream {r['single_items_per_s']:.1f} "
                f"items/s ({r['ratio']:.1f}x); perplexities agree to {r['max_rel_diff']:.1e}")
    return r["status"]


def ratios(arms: dict) -> dict:
    out = {}
    d, t = arms.get("distill", {}), arms.get("trl", {})
    if d.get("status") == "ok" and t.get("status") == "ok":
        out["distill_tokens_per_s_ours_over_trl"] = d["tokens_per_s"] / t["tokens_per_s"]
        out["distill_steady_tokens_per_s_ours_over_trl"] = d["steady_tokens_per_s"] / t["steady_tokens_per_s"]
        out["distill_peak_memory_ours_over_trl"] = d["peak_gib"] / t["peak_gib"]
    s = arms.get("safety", {})
    if s.get("status") == "ok":
        out["safety_items_per_s_batched_over_single"] = s["ratio"]
    return out


def summary_line(report: dict) -> str:
    """The results page's line: the ratios measured so far."""
    return "; ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()) or "no ratio measured"


def write_json(path: Path, obj: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def commit() -> str:
    if os.environ.get("SLMKIT_COMMIT"):
        return os.environ["SLMKIT_COMMIT"][:12]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "nocommit"
    except (OSError, subprocess.TimeoutExpired):
        return "nocommit"


def version(package: str) -> str | None:
    """Installed version without importing it (bench/gpu.sh imports each to check it works)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(package)
    except PackageNotFoundError:
        return None


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"), "trl": version("trl"),
            "accelerate": version("accelerate"), "pytest": version("pytest"),
            "cuda": None, "cuda_available": False, "gpu": None, "gpu_memory_gib": None}
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {"cuda_available": True, "gpu": props.name,
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    except ImportError:
        pass
    label = info["gpu"] or f"{cpu.split('@')[0]} {info['cores']}c"
    label = re.sub(r"\((r|tm)\)|cpu|nvidia|processor", "", label, flags=re.I)
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "unknown"
    return info


# --------------------------------------------------------------------------- the arms (children)

def child(args) -> int:
    work = Path(args.work)
    out = {"models": arm_models, "tests": arm_tests, "distill": arm_distill, "trl": arm_trl,
           "safety": arm_safety}[args.arm](args, work)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def build(shape, tok, folder: Path, dtype, device: str, seed: int) -> int:
    """A random-init Qwen2 model of `shape` with `tok`'s special tokens, saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    hidden, layers, heads, kv, mlp, vocab, tied = shape
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                      max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 1.5B init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return n


def rows_of(tok, n: int, length: int, seed: int) -> list[dict]:
    """n chat examples of `length` - 16 .. `length` tokens as slmkit encodes them (chat template,
    answer ~1/3 of the tokens), so no trainer cuts any and every batch is full."""
    import random

    from slmkit.data import encode, to_example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(length)]  # more words than tokens fit
        answer = " ".join(words[: length // 6])
        p = length // 3

        def size(p):
            row = {"messages": [{"role": "user", "content": " ".join(words[length // 6:][:p])},
                                {"role": "assistant", "content": answer}]}
            return len(encode(to_example(row, ""), tok, max_length=10**9)[0]), row

        lo, hi = 1, length - length // 6
        while lo < hi:  # the longest prompt that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid)[0] <= length else (lo, mid - 1)
        n_tok, row = size(lo)
        if n_tok < length - 16:
            raise RuntimeError(f"could not build a {length}-token example (got {n_tok})")
        out.append(row)
    return out


def arm_models(args, work: Path) -> dict:
    import torch

    from conftest import make_tokenizer

    tok = make_tokenizer()
    shapes = QUICK if args.quick else REAL
    device = args.device
    t = build(shapes["teacher"], tok, work / "teacher", torch.bfloat16, device, seed=0)
    s = build(shapes["student"], tok, work / "student", torch.float32, device, seed=1)
    for name in ("teacher", "student"):  # tiny pair for the tests arm's CLI run
        build(TINY[name], tok, work / f"tiny-{name}", torch.float32, "cpu", seed=2)
    n = args.steps * args.batch_size
    rows = rows_of(tok, n + 1, args.seq_len, seed=0)
    with open(work / "train.jsonl", "w") as f:
        for i, row in enumerate(rows):  # the last one held out: slm distill's eval is not timed
            f.write(json.dumps(row | {"split": "eval" if i == n else "train"}) + "\n")
    from eval_speed import safety_items

    (work / "safety.json").write_text(json.dumps(safety_items(args.sentences)))
    return {"teacher_params": t, "student_params": s, "examples": n, "tokenizer_size": len(tok)}


def arm_tests(args, work: Path) -> dict:
    files = QUICK_TEST_FILES if args.quick else TEST_FILES
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                        *files], capture_output=True, text=True, cwd=ROOT, env=env)
    lines = p.stdout.strip().splitlines() or ["(no output)"]
    failures = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    pytest_r = {"files": files, "exit": p.returncode, "summary": lines[-1].strip("= "),
                "failures": failures[:30]}
    # the distill CLI end to end on the device itself (most distill tests pin --device cpu)
    out = work / "cli-student"
    cli = [sys.executable, "-m", "slmkit", "distill", "--student", str(work / "tiny-student"),
           "--teacher", str(work / "tiny-teacher"), "--data", str(work / "train.jsonl"), "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--device", args.device]
    c = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, env=env)
    ok = c.returncode == 0 and (out / "model.safetensors").exists()
    record = out / "training_record.json"
    meta = json.loads(record.read_text()) if record.exists() else {}
    cli_r = {"device": args.device, "status": "ok" if ok else f"exit {c.returncode}",
             "stderr_tail": "" if ok else c.stderr[-800:],
             "recorded": {k: meta.get(k) for k in ("device", "precision") if k in meta}}
    status = "ok" if p.returncode == 0 and ok else "failed"
    why = {} if status == "ok" else {"why": f"pytest exit {p.returncode} ({pytest_r['summary']}); cli {cli_r['status']}"}
    return {"status": status, "pytest": pytest_r, "cli": cli_r} | why


def peak_memory(device: str) -> tuple[float, str]:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU peak RSS"


def arm_distill(args, work: Path) -> dict:
    import torch

    from slmkit.distill import DistillConfig, distill

    out = distill(DistillConfig(student=str(work / "student"), teacher=str(work / "teacher"),
                                data=str(work / "train.jsonl"), out=str(work / "ours"),
                                max_steps=args.steps, batch_size=args.batch_size, max_length=args.seq_len,
                                lr=1e-5, eval_every=10**9, save_every=10**9, device=args.device,
                                activation_checkpointing="off", restart=True))
    peak, kind = peak_memory(args.device)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) >= 1 and "elapsed_s" in r]
    first, last = steps[0], steps[-1]
    return {"trainer": "slm distill", "steps": last["step"], "batch_size": args.batch_size,
            "tokens": last["tokens"], "train_s": last["elapsed_s"],
            "tokens_per_s": last["tokens"] / last["elapsed_s"],
            "steady_tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "peak_gib": peak, "peak_kind": kind, "final_kd": last.get("kd"),
            "finite": all(r.get("loss") == r.get("loss") for r in steps),
            "cuda_device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}


def arm_trl(args, work: Path) -> dict:
    """TRL's GKDTrainer on the same rows; models loaded as slm distill loads them."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from slmkit import models, precision
    from slmkit.data import encode, read_jsonl, to_example

    cuda = args.device.startswith("cuda")
    bf16 = precision.autocast_dtype(args.device) is not None  # slmkit's rule, so both match
    student, tok = models.load_model(str(work / "student"), dtype="float32", device=args.device)
    teacher, _ = models.load_model(str(work / "teacher"), dtype="bfloat16" if bf16 else "float32",
                                   device=args.device)
    rows = [r for _, r in read_jsonl(work / "train.jsonl") if r["split"] == "train"]
    lengths = [len(encode(to_example(r, ""), tok, max_length=args.seq_len)[0]) for r in rows]
    student.train()

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends = None, []

        def _now(self):
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, *a, **kw):
            if self.begin is None:
                self.begin = self._now()

        def on_step_end(self, *a, **kw):
            self.ends.append(self._now())

    clock = Clock()
    cfg = GKDConfig(output_dir=str(work / "trl"), lmbda=0.0, beta=0.0, temperature=1.0,
                    per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                    max_steps=args.steps, max_length=args.seq_len, learning_rate=1e-5,
                    lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10**6,
                    save_strategy="no", report_to=[], use_cpu=not cuda, bf16=bf16,
                    gradient_checkpointing=False, dataloader_num_workers=0, disable_dropout=True, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, callbacks=[clock],
                         train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
                         processing_class=tok)
    result = trainer.train()
    peak, kind = peak_memory(args.device)
    steps = len(clock.ends)
    per_step = sum(lengths) / len(lengths) * args.batch_size  # every row 496-512 tokens
    tokens = per_step * steps
    train_s = clock.ends[-1] - clock.begin
    return {"trainer": "TRL GKDTrainer", "steps": steps, "batch_size": args.batch_size,
            "tokens": round(tokens), "train_s": train_s, "tokens_per_s": tokens / train_s,
            "steady_tokens_per_s": per_step * (steps - 1) / (clock.ends[-1] - clock.ends[0]),
            "peak_gib": peak, "peak_kind": kind, "train_runtime": result.metrics.get("train_runtime"),
            "final_loss": result.metrics.get("train_loss")}


def arm_safety(args, work: Path) -> dict:
    import math

    import torch

    from slmkit import models
    from slmkit.precision import autocast
    from slmkit.safety import safety_score, sentence_perplexities

    device = models.pick_device(args.device)
    model, tok = models.load_model(str(work / "student"), dtype=models.compute_dtype("auto", device),
                                   device=device)
    items = json.loads((work / "safety.json").read_text())
    texts = [it["text"] for it in items]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def single(texts):
        """SafeNLP's loop: one sentence per forward, exp(mean NLL), float32 loss."""
        out = []
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]], device=device)
            with torch.no_grad(), autocast(device):
                logits = model(input_ids=ids).logits
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            out.append(math.exp(nll.item()))
        return out

    single(texts[:8]), sentence_perplexities(model, tok, texts[:8], batch_size="auto")  # warm-up
    sync()
    t0 = time.perf_counter()
    batched = sentence_perplexities(model, tok, texts, batch_size="auto")
    sync()
    t1 = time.perf_counter()
    ref = single(texts)
    sync()
    t2 = time.perf_counter()
    diff = max(abs(a - b) / b for a, b in zip(batched, ref))
    s_b, s_r = safety_score(items, batched)["score"], safety_score(items, ref)["score"]
    return {"sentences": len(texts), "tokens": sum(len(tok(t)["input_ids"]) for t in texts),
            "batched_s": t1 - t0, "single_s": t2 - t1, "batched_items_per_s": len(texts) / (t1 - t0),
            "single_items_per_s": len(texts) / (t2 - t1), "ratio": (t2 - t1) / (t1 - t0),
            "max_rel_diff": diff, "score_batched": s_b, "score_single": s_r,
            "dtype": str(next(model.parameters()).dtype)}


if __name__ == "__main__":
    raise SystemExit(main())
