"""Does KD beat plain fine-tuning, and does a teacher labelling unlabelled inputs help?

Every arm starts from one pruned init and reads the same token budget (`--tokens`, passed as
`slm distill --max-tokens`: prompt + answer tokens the student reads), on real DialogSum dev data
(../shared/data/dialogsum-dev.jsonl from the repository root; absent: prints `skip:` and exits 0).

    python bench/kd_vs_ce.py --quick                         # smoke check, tiny budgets
    python bench/kd_vs_ce.py --tune-teacher                  # the full run, teacher tuned here
    python bench/kd_vs_ce.py --teacher runs/dialogsum/teacher_tuned --tokens 50000

Split (seed --seed 0): the 500 dev lines are shuffled once; the first --heldout (100) are held
out, never trained on, and are every arm's test set; the next --pool (default: the other 400)
are the training pool. Its first --labelled (50) lines are the few-labels set; the rest of the
pool is the unlabelled set (its summaries removed) that the teacher labels. Each training file
ends with one held-out line marked "split": "eval": `slm distill` then holds back no training
line for its own evals, and they cost nothing (the loop evaluates at its start and end).

Teacher: --teacher (default runs/dialogsum/teacher_tuned), or with --tune-teacher `default`
fine-tuned here on the pool (`slm distill --alpha-ce 1`, --teacher-tokens, default one epoch).
A given teacher must not have been tuned on the held-out dialogues. With --quick and no teacher
folder, the embedded `default` (zero-shot) teaches; without --quick a missing default teacher
is a `skip:` (exit 0), as `make bench` runs every script bare. The pruned init is made once
from the teacher: `slm prune TEACHER --target 0.5 --calib POOL` (--prune-args for another shape,
e.g. "--layers 18 --ffn 1152").

Arms (all from the pruned init, --tokens each, --batch-size 2, --lr 3e-4, seed 0; KD is forward
KL at tau 1 from the online teacher, exact over the full vocabulary: a top-k cache would cost a
teacher pass over the whole pool per training file, more than the budget's half epoch reads):

    ce           pool, human summaries, CE only (--alpha-ce 1, no teacher)
    kd           pool, human summaries, KD only (--alpha-ce 0)
    kd_ce        pool, human summaries, KD + CE (--alpha-ce 0.5)
    few_ce       the --labelled lines alone, CE only
    few_teacher  the --labelled lines + the unlabelled lines with the teacher's greedy summaries
                 (`slm generate -n 1 --no-judge`), KD + CE (--alpha-ce 0.5)

The few-labels case compares few_ce, few_teacher and kd_ce: the same dialogues as few_teacher,
every summary human-written, the same loss. With 500 dev lines and 100 held out the pool is 400
(50 labelled + 350 teacher-labelled vs 400 human-labelled); --heldout 50 gives issue 16's
50 + 400 vs 450. Reference rows: the teacher and the untrained pruned init.

Per row: ROUGE-L F x 100 of greedy summaries (`slm eval --task summarize`, 64 new tokens) on the
held-out dialogues, +- its standard error over dialogues (std / sqrt(n)); answer perplexity
(exp of the mean NLL of the reference summary tokens of all held-out dialogues, by `slm
distill`'s held-out eval, run on each model without training); tokens read, epochs (examples
seen / training lines), training seconds (the loop with the teacher's forward passes, not model
loading). Then paired differences (same dialogues, s.e. of the per-dialogue difference) for the questions
asked. Results go to --out (JSON, written atomically).

Resumable: an arm whose student folder is complete is reused, a killed `slm distill` continues
from its checkpoint (every 25 steps), and an evaluated model is not evaluated again. --work
keeps a settings.json; other settings there are refused (use another --work).

Cost, measured on the shared 2-core CPU with OMP_NUM_THREADS=1: --quick took 16.5 min at load
average ~2-3. Its rates give the full run (100 held-out, 50,000 tokens per arm,
~281 tokens an example, so 0.44 epochs of the 400-line pool and 3.6 of the 50 labelled lines):
training ~108 tokens/s CE and ~68 with the online teacher (6 arms: ~65 min), 350 teacher
summaries at ~3.7 s each (~22 min), 8 models x 100 greedy summaries at ~2.5 s each (~33 min),
8 held-out perplexities (~6 min): about 2 h at load ~2-3, 3.5-4 h at ~5. --tune-teacher adds one
epoch of the pool on the 135M teacher (~112k tokens: ~40 min, twice that under load):

    OMP_NUM_THREADS=1 python bench/kd_vs_ce.py --tune-teacher

Measured: that with --teacher-tokens 50000 --prune-args "--layers 17 --ffn 800" took 99 min
(teacher ~12, teacher labels 20, training 6-11 per arm, evals ~2-3 per model) on one core, the
other busy; the table is in the README (slm distill).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT.parent / "shared" / "data" / "dialogsum-dev.jsonl"
TEACHER = ROOT / "runs" / "dialogsum" / "teacher_tuned"
FULL = {"heldout": 100, "pool": None, "labelled": 50, "tokens": 50_000}
QUICK = {"heldout": 20, "pool": 50, "labelled": 10, "tokens": 2_000}  # a few minutes of training
PPL_BATCH = 8  # held-out examples per forward pass of held_ppl
MAX_NEW_TOKENS = 64  # the `slm eval` default; DialogSum summaries are ~21 words
ARMS = {  # key: (label, training file, alpha_ce, more distill flags); alpha_ce < 1: with the teacher
    "ce": ("CE only, pool", "train_pool", 1.0, []),
    "kd": ("KD only, pool", "train_pool", 0.0, []),
    "kd_ce": ("KD + CE, pool", "train_pool", 0.5, []),
    "kd_ce_hidden": ("KD + CE + layer matching (--hidden-kd 5), pool", "train_pool", 0.5,
                     ["--hidden-kd", 5]),
    "few_ce": ("CE only, labelled alone", "train_few", 1.0, []),
    "few_teacher": ("KD + CE, labelled + teacher-labelled", "train_few_teacher", 0.5, []),
}
QUESTIONS = [  # (a, b, what a - b answers)
    ("kd", "ce", "KD only vs CE only (does KD beat plain fine-tuning?)"),
    ("kd_ce", "ce", "KD + CE vs CE only"),
    ("kd_ce_hidden", "kd_ce", "layer matching on top of KD + CE (--hidden-kd 5)"),
    ("few_teacher", "few_ce", "labelled + teacher-labelled vs labelled alone (does teacher labelling help?)"),
    ("kd_ce", "few_teacher", "all human labels vs teacher labels for the same dialogues"),
]


def rel(p) -> str:
    p = Path(p)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def slm(*args) -> float:
    """Run one `slm` command from the repository root; returns its seconds, exits on failure."""
    args = [rel(a) if os.path.isabs(a) else str(a) for a in map(str, args)]
    print(f"\n$ slm {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "slmkit", *args], cwd=ROOT).returncode
    if rc:
        sys.exit(f"bench/kd_vs_ce.py: `slm {args[0]}` exited {rc}; fix it and rerun (finished steps are kept)")
    return time.perf_counter() - t0


def write_atomic(path: Path, text: str) -> None:
    from slmkit.models import atomic_write

    with atomic_write(path) as f:
        f.write(text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    from slmkit.data import read_jsonl as numbered

    return [row for _, row in numbered(path)]


def pair(row: dict) -> dict:
    return {"dialogue": row["dialogue"], "summary": row["summary"]}


def make_split(d: Path, seed: int, heldout: int, pool: int | None, labelled: int) -> dict:
    """Write the split's files into d; returns {name: number of lines}."""
    rows = read_jsonl(SRC)
    random.Random(seed).shuffle(rows)
    held, rest = rows[:heldout], rows[heldout:]
    rest = rest[:pool] if pool else rest
    if len(held) < heldout or labelled >= len(rest):
        sys.exit(f"bench/kd_vs_ce.py: {len(rows)} lines cannot give --heldout {heldout}, a pool of "
                 f"{pool or 'the rest'} and --labelled {labelled} (fewer than the pool)")
    evals = [pair(r) | {"split": "eval"} for r in held]
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "heldout.jsonl", [pair(r) | {"fname": r["fname"]} for r in held])
    # held_ppl's file: every held-out line, and one batch of training lines that setup() wants
    write_jsonl(d / "ppl.jsonl", [pair(r) for r in rest[:PPL_BATCH]] + evals)
    write_jsonl(d / "pool.jsonl", [pair(r) for r in rest])  # prune's calibration text
    write_jsonl(d / "train_pool.jsonl", [pair(r) for r in rest] + evals[:1])
    write_jsonl(d / "train_few.jsonl", [pair(r) for r in rest[:labelled]] + evals[:1])
    write_jsonl(d / "unlabelled.jsonl", [{"fname": r["fname"], "dialogue": r["dialogue"]}
                                         for r in rest[labelled:]])
    return {"heldout": len(held), "pool": len(rest), "labelled": labelled,
            "unlabelled": len(rest) - labelled}


def teacher_labels(d: Path, teacher: str, labelled: int) -> tuple[int, float]:
    """The teacher's greedy summaries of the unlabelled dialogues -> train_few_teacher.jsonl;
    returns (teacher-labelled lines kept, seconds this run)."""
    dest = d / "train_few_teacher.jsonl"
    seconds = 0.0
    if not dest.is_file():  # `slm generate` resumes by itself if killed; dest is written last
        seconds = slm("generate", "--teacher", teacher, "--task", "summarize",
                      "--inputs", d / "unlabelled.jsonl", "--out", d / "teacher_labelled.jsonl",
                      "-n", 1, "--no-judge", "--threshold", 0, "--dedup-threshold", 1,
                      "--max-new-tokens", MAX_NEW_TOKENS)
        few = read_jsonl(d / "train_few.jsonl")
        gen = [pair(r) for r in read_jsonl(d / "teacher_labelled.jsonl")]
        write_jsonl(dest, few[:labelled] + gen + few[labelled:])
    return sum(1 for r in read_jsonl(dest) if r.get("split") != "eval") - labelled, seconds


def train_args(args, lr: float) -> list:
    return ["--task", "summarize", "--batch-size", args.batch_size, "--lr", lr,
            "--max-length", args.max_length, "--warmup-ratio", 0.1, "--seed", 0,
            "--eval-every", 10**9, "--eval-max", 1, "--save-every", 25]


def record(folder: Path) -> dict | None:
    f = folder / "training_record.json"
    return json.loads(f.read_text()) if f.is_file() else None


def held_ppl(model: str, key: str, work: Path, args) -> float:
    """Answer perplexity of the held-out references (cached), by `slm distill`'s own held-out
    eval on data/ppl.jsonl (every held-out line, split=eval), without training."""
    from slmkit.distill import DistillConfig, evaluate_held, setup

    done = work / "eval" / key / "ppl.json"
    if done.is_file():
        return json.loads(done.read_text())["answer_ppl"]
    tmp = work / ".ppl"
    run = setup(DistillConfig(student=model, data=str(work / "data" / "ppl.jsonl"), task="summarize",
                              alpha_ce=1.0, out=str(tmp / "x"), batch_size=PPL_BATCH,
                              max_length=args.max_length, eval_max=args.heldout))
    try:
        res = evaluate_held(run)
    finally:
        del run
        shutil.rmtree(tmp, ignore_errors=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(done, json.dumps({"answer_ppl": res["eval_ppl"], "tokens": res["eval_tokens"]}))
    return res["eval_ppl"]


def rouge_rows(model: str, name: str, work: Path) -> dict:
    """Per-dialogue ROUGE-L F of `model`'s greedy summaries of the held-out set (cached)."""
    from slmkit.metrics import rouge

    out = work / "eval" / name
    done = out / "rouge_l.json"
    if done.is_file():
        return json.loads(done.read_text())
    seconds = slm("eval", model, "--names", name, "--task", "summarize",
                  "--data", work / "data" / "heldout.jsonl", "--split", "all",
                  "--max-new-tokens", MAX_NEW_TOKENS, "--out", out)
    preds = read_jsonl(out / "predictions" / f"{name}.jsonl")
    per = [rouge([p["prediction"]], [p["references"]])["rougeL"] for p in preds]
    reported = json.loads((out / "metrics.json").read_text())["models"][0]["task"]["rougeL"]
    assert abs(statistics.fmean(per) - reported) < 1e-9, (statistics.fmean(per), reported)
    res = {"where": [p["where"] for p in preds], "rougeL": per, "eval_s": round(seconds, 1),
           "sample": preds[0]["prediction"]}
    write_atomic(done, json.dumps(res))
    return res


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke check: {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    ap.add_argument("--teacher", default=None, help=f"task-tuned teacher folder (default {rel(TEACHER)})")
    ap.add_argument("--tune-teacher", action="store_true",
                    help="fine-tune `default` on the pool (CE) and use it as the teacher")
    ap.add_argument("--teacher-tokens", type=int, default=None,
                    help="--tune-teacher budget in tokens (default: one epoch of the pool)")
    ap.add_argument("--prune-args", default="--target 0.5", help="slm prune's shape flags")
    ap.add_argument("--tokens", type=int, default=None, help=f"training tokens per arm ({FULL['tokens']})")
    ap.add_argument("--heldout", type=int, default=None, help=f"held-out dialogues ({FULL['heldout']})")
    ap.add_argument("--pool", type=int, default=None, help="training pool (default: every other line)")
    ap.add_argument("--labelled", type=int, default=None,
                    help=f"labelled lines of the few-labels case ({FULL['labelled']})")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=512, help="tokens per example (dialogues ~260)")
    ap.add_argument("--seed", type=int, default=0, help="the split's shuffle")
    ap.add_argument("--work", default=None, help="run folder (default runs/kd_vs_ce[-quick])")
    ap.add_argument("--out", default=None, help="results JSON (default WORK/results.json)")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not SRC.is_file():
        print(f"skip: {rel(SRC)} not found (DialogSum dev, ../shared/data from the repository)")
        return 0
    work = Path(args.work or ROOT / "runs" / ("kd_vs_ce-quick" if args.quick else "kd_vs_ce")).resolve()
    d = work / "data"
    t_start = time.perf_counter()

    if args.tune_teacher:
        teacher = work / "teacher_tuned"
    elif args.teacher:
        teacher = Path(args.teacher) if args.teacher != "default" else "default"
    elif TEACHER.is_dir() or not args.quick:
        teacher = TEACHER
    else:
        teacher = "default"
        print(f"note: {rel(TEACHER)} not found; --quick uses the embedded `default` (zero-shot) as teacher")
    if isinstance(teacher, Path) and not args.tune_teacher and not (teacher / "config.json").is_file():
        if not args.teacher:  # the default teacher: `make bench` runs every script bare
            print(f"skip: {rel(TEACHER)} not found; pass --tune-teacher, --teacher FOLDER (or "
                  "`default`), or --quick")
            return 0
        print(f"bench/kd_vs_ce.py: teacher `{rel(teacher)}` not found; pass --tune-teacher, or --teacher "
              "FOLDER (or `default`)", file=sys.stderr)
        return 2
    teacher = str(teacher.resolve()) if isinstance(teacher, Path) else teacher

    settings = {k: getattr(args, k) for k in ("seed", "heldout", "pool", "labelled", "tokens",
                                              "batch_size", "lr", "max_length", "prune_args",
                                              "teacher_tokens")}
    settings["teacher"] = rel(teacher)
    work.mkdir(parents=True, exist_ok=True)
    if (work / "settings.json").is_file():
        old = json.loads((work / "settings.json").read_text())
        differ = [k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k)]
        if differ:
            print(f"bench/kd_vs_ce.py: {rel(work)} was made with other settings ("
                  + ", ".join(f"{k}: {old.get(k)} -> {settings.get(k)}" for k in sorted(differ))
                  + "); give another --work or delete it", file=sys.stderr)
            return 2
    write_atomic(work / "settings.json", json.dumps(settings, indent=1))
    counts = make_split(d, args.seed, args.heldout, args.pool, args.labelled)
    print(f"split (seed {args.seed}): {counts}; teacher {rel(teacher)}", flush=True)

    if args.tune_teacher and record(work / "teacher_tuned") is None:
        budget = ["--max-tokens", args.teacher_tokens] if args.teacher_tokens else []
        slm("distill", "--student", "default", "--data", d / "train_pool.jsonl", "--alpha-ce", 1,
            "--out", work / "teacher_tuned", *train_args(args, 1e-4), *budget)  # the recipes' lr
    pruned = work / "pruned"
    if not (pruned / "prune_plan.json").is_file():
        slm("prune", teacher, *shlex.split(args.prune_args), "--calib", d / "pool.jsonl", "--out", pruned)
    n_teacher_lines, gen_s = teacher_labels(d, teacher, args.labelled)
    n_train = {"train_pool": counts["pool"], "train_few": args.labelled,
               "train_few_teacher": args.labelled + n_teacher_lines}

    rows = {}
    for key, label, model in (("teacher", f"teacher ({rel(teacher)})", teacher),
                              ("pruned", "pruned init, untrained", str(pruned))):
        rows[key] = {"label": label, "answer_ppl": held_ppl(model, key, work, args),
                     **rouge_rows(model, key, work)}
    for key, (label, file, alpha, flags) in ARMS.items():
        out = work / key
        if record(out) is None:
            teach = ["--teacher", teacher] if alpha < 1 else []
            slm("distill", "--student", pruned, *teach, "--data", d / f"{file}.jsonl", "--alpha-ce", alpha,
                "--max-tokens", args.tokens, "--out", out, *flags, *train_args(args, args.lr))
        rec = record(out)
        rows[key] = {"label": label, "train_lines": n_train[file], "alpha_ce": alpha,
                     "teacher": alpha < 1, "tokens": rec["tokens"], "steps": rec["steps"],
                     "epochs": rec["steps"] * args.batch_size / n_train[file],
                     "train_s": rec["time_s"], "answer_ppl": held_ppl(str(out), key, work, args),
                     **rouge_rows(str(out), key, work)}

    for r in rows.values():
        r["rougeL_mean"], r["rougeL_se"] = (100 * x for x in mean_se(r["rougeL"]))
    base = rows["ce"]["rougeL"]
    n = len(base)
    print(f"\n{n} held-out DialogSum dev dialogues (seed {args.seed}); pool {counts['pool']} lines; "
          f"budget {args.tokens:,} tokens per arm, batch {args.batch_size}, lr {args.lr}; "
          f"teacher {rel(teacher)}; {n_teacher_lines} teacher-labelled lines ({gen_s:.0f} s to write "
          f"this run); prune {args.prune_args}\n")
    print("| arm | train lines | tokens | epochs | ROUGE-L +- s.e. | vs CE only (paired) | answer ppl | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        diff = [100 * (a - b) for a, b in zip(r["rougeL"], base)]
        vs = "-" if key == "ce" else "{:+.1f} +- {:.1f}".format(*mean_se(diff))
        budget = (f"{r['train_lines']} | {r['tokens']:,} | {r['epochs']:.2f}" if "tokens" in r
                  else "- | - | -")
        print(f"| {key}: {r['label']} | {budget} | {r['rougeL_mean']:.1f} +- {r['rougeL_se']:.1f} | "
              f"{vs} | {r['answer_ppl']:.2f} | {r.get('train_s', '-')} |")
    answers = []
    print()
    for a, b, what in QUESTIONS:
        m, se = mean_se([100 * (x - y) for x, y in zip(rows[a]["rougeL"], rows[b]["rougeL"])])
        answers.append({"a": a, "b": b, "question": what, "rougeL_diff": m, "se": se,
                        "ppl_a": rows[a]["answer_ppl"], "ppl_b": rows[b]["answer_ppl"]})
        print(f"{what}: ROUGE-L {m:+.1f} +- {se:.1f} (paired, {n} dialogues); answer ppl "
              f"{rows[a]['answer_ppl']:.2f} vs {rows[b]['answer_ppl']:.2f}")
    wall = time.perf_counter() - t_start
    print(f"\nwall time this run: {wall / 60:.1f} min")

    result = {"settings": settings, "split": counts, "teacher_labelled_lines": n_teacher_lines,
              "max_new_tokens": MAX_NEW_TOKENS, "rows": rows, "paired": answers,
              "wall_s_this_run": round(wall, 1)}
    out = Path(args.out) if args.out else work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1))
    print(f"results: {rel(out.resolve())}")
    from slmkit import results

    results.write("kd_vs_ce", result, summary="; ".join(
        f"{a['question']}: ROUGE-L {a['rougeL_diff']:+.1f} +- {a['se']:.1f}" for a in answers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
