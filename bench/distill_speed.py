"""Training speed of `slm distill` against TRL's GKDTrainer (lmbda = 0: off-policy, beta = 0:
forward KL), side by side in one run: same student, teacher, examples, batch size, max length,
dtype and thread count; one epoch over the same --examples dialogues each, no evaluation.

    python bench/distill_speed.py --student /tmp/slmkit-bench-distill/pruned     # from bench/distill.py
    python bench/distill_speed.py --student pruned/ --examples 32 --batch-size 4 --threads 1

tokens/s = non-padding tokens (prompt + answer, as slmkit encodes them) of the epoch / training
wall time (from just before the first step to the end of the last, first step included, for both;
model loading and set-up excluded: our metrics.jsonl `elapsed_s`, TRL's `train_runtime`). Achieved FLOP/s = (6 N_student + 2 N_teacher) x
tokens / time (N = parameters, the usual dense estimate; it ignores attention and counts every
position's lm_head, which our loop skips on prompt tokens, so it flatters neither side), against
the measured float32 (or bf16) matmul peak on this machine. TRL is not a dependency of slmkit:
`pip install trl` to run this (it is skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from slmkit import data, models, precision
from slmkit import results as slm_results
from slmkit.distill import DistillConfig, distill
from slmkit.tasks import get_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def matmul_peak(dtype, n: int = 1024, reps: int = 20) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` over `reps` tries."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="student model folder (e.g. the 50 %% pruned default)")
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--examples", type=int, default=24, help="dialogues in the epoch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "slmkit-bench-distill-speed"))
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        print(f"bench/distill_speed.py: skipped, TRL is not installed ({e}); `pip install trl`",
              file=sys.stderr)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = get_task("summarize")
    rows = [row for _, row in data.read_jsonl(SHARED / "dialogsum-dev.jsonl")][:args.examples]
    train_file = work / "train.jsonl"
    with open(train_file, "w") as f:
        for row in rows:
            f.write(json.dumps({"dialogue": row["dialogue"], "summary": row["summary"],
                                "split": "train"}) + "\n")
        f.write(json.dumps({"dialogue": rows[0]["dialogue"], "summary": rows[0]["summary"],
                            "split": "eval"}) + "\n")  # one held-out line: eval is not timed
    tok = models.load_tokenizer(models.resolve(args.student))
    examples = [data.to_example(r, "", task, need_answer=True) for r in rows]
    lengths = [len(data.encode(e, tok, args.max_length)[0]) for e in examples]
    tokens = sum(lengths)
    steps = args.examples // args.batch_size
    teacher_n = models.count_parameters(models.load_model(args.teacher, device="cpu")[0])
    student_n = models.count_parameters(models.load_model(args.student, device="cpu")[0])
    use_bf16 = precision.cpu_has_bf16()
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    peak = matmul_peak(dtype)
    flops_per_token = 6 * student_n + 2 * teacher_n
    results = {}

    # ours
    out = distill(DistillConfig(student=args.student, teacher=args.teacher, data=str(train_file),
                                task="summarize", out=str(work / "ours"), max_steps=steps,
                                batch_size=args.batch_size, max_length=args.max_length, lr=1e-4,
                                eval_every=10**9, save_every=10**9, device="cpu", bf16=use_bf16))
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    results["slm distill"] = {"seconds": last["elapsed_s"], "tokens": last["tokens"]}

    # TRL: same examples as chat messages (its collator applies the chat template and masks the
    # prompt, as ours does), same length cap, no gradient checkpointing (ours has none)
    msgs = [{"messages": [{"role": "user", "content": e.prompt},
                          {"role": "assistant", "content": e.answer}]} for e in examples]
    student, s_tok = models.load_model(args.student, device="cpu")
    teacher, _ = models.load_model(args.teacher, device="cpu")
    student.train()
    cfg = GKDConfig(output_dir=str(work / "trl"), lmbda=0.0, beta=0.0, temperature=1.0,
                    per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                    num_train_epochs=1, max_length=args.max_length, learning_rate=1e-4,
                    lr_scheduler_type="cosine", max_grad_norm=1.0,
                    logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                    bf16=use_bf16, gradient_checkpointing=False, dataloader_num_workers=0,
                    disable_dropout=True, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg,
                         train_dataset=Dataset.from_list(msgs), processing_class=s_tok)
    # TRL's own train_runtime: from just before its first step to the end, like our elapsed_s
    runtime = float(trainer.train().metrics["train_runtime"])
    results["TRL GKDTrainer"] = {"seconds": runtime, "tokens": tokens}

    print(f"\nstudent {student_n / 1e6:.1f}M, teacher {teacher_n / 1e6:.1f}M parameters; "
          f"{args.examples} dialogues ({tokens:,} tokens), batch {args.batch_size}, max length "
          f"{args.max_length}, {'bf16 autocast' if use_bf16 else 'float32'}, "
          f"{torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| trainer | seconds | tokens/s | achieved GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        fl = flops_per_token * tps
        r |= {"tokens_per_s": tps, "gflops": fl / 1e9, "peak_fraction": fl / peak}
        print(f"| {name} | {r['seconds']:.1f} | {tps:.1f} | {fl / 1e9:.1f} | {100 * fl / peak:.0f}% |")
    ratio = results["slm distill"]["tokens_per_s"] / results["TRL GKDTrainer"]["tokens_per_s"]
    print(f"\nslm distill / TRL = {ratio:.2f}x tokens/s (goal >= 1.5x)")
    slm_results.write("distill_speed", {
        "trainers": results, "ratio": ratio, "peak_flops": peak, "student_parameters": student_n,
        "teacher_parameters": teacher_n, "examples": args.examples, "tokens": tokens,
        "batch_size": args.batch_size, "max_length": args.max_length, "bf16": use_bf16,
        "threads": torch.get_num_threads()},
        summary=f"slm distill / TRL GKDTrainer = {ratio:.2f}x tokens/s "
                f"({'bf16 autocast' if use_bf16 else 'float32'}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
