"""Distillation at the sizes people distil: a Llama-3.2-1B-shaped teacher (hidden 2048, 16 layers,
32/8 heads, MLP 8192, vocabulary 128,256; 1.24B parameters) and a ~0.31B student of the shape a
prune of it gives (hidden 1024, 12 layers, 16/4 heads, MLP 4096, the same vocabulary), random
weights (speed and memory depend on shapes, not values). `slm distill` and TRL's GKDTrainer
(lmbda 0: off-policy, beta 0: forward KL) run the same steps on the same DialogSum dialogues
(SmolLM2's tokenizer; its ids fit the larger vocabulary), batch, length and dtype, each in its
own process so each peak RSS is its own.

    python bench/scale.py                               # CPU: 2 steps of 2 x 256 tokens
    python bench/scale.py --device cuda --steps 20 --batch-size 8 --max-length 1024   # a GPU

tokens/s = non-padding tokens of the steps / training wall time (ours: metrics.jsonl
`elapsed_s`; TRL: `train_runtime`), model loading excluded. Peak RSS: VmHWM of the process; on
CUDA also torch.cuda.max_memory_allocated. TRL is not a dependency of slmkit: `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEACHER = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192)
STUDENT = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
               intermediate_size=4096)


def make_models(work: Path) -> None:
    """Random-weight teacher and student folders with SmolLM2's tokenizer (made once)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slmkit import models

    tok = models.load_tokenizer(models.resolve("default"))
    for name, shape in (("teacher", TEACHER), ("student", STUDENT)):
        folder = work / name
        if (folder / "config.json").is_file():
            continue
        cfg = LlamaConfig(vocab_size=128_256, max_position_embeddings=4096, tie_word_embeddings=True,
                          rope_theta=500_000.0, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # bf16 on disk: half the bytes
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model


def write_data(work: Path, n: int) -> Path:
    rows = [json.loads(line) for line in open(SHARED / "dialogsum-dev.jsonl")][:n + 1]
    path = work / "train.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"dialogue": r["dialogue"], "summary": r["summary"],
                                "split": "eval" if i == n else "train"}) + "\n")
    return path


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(which: str, args, work: Path) -> dict:
    """One trainer in this process; returns its figures."""
    import torch

    from slmkit import data, models, precision
    from slmkit.tasks import get_task

    task = get_task("summarize")
    train = write_data(work, args.steps * args.batch_size)
    tok = models.load_tokenizer(str(work / "student"))
    rows = [row for _, row in data.read_jsonl(train) if row.get("split") != "eval"]
    examples = [data.to_example(r, "", task, need_answer=True) for r in rows]
    tokens = sum(len(data.encode(e, tok, args.max_length)[0]) for e in examples)
    bf16 = precision.autocast_dtype(torch.device(args.device)) is not None
    if which == "ours":
        from slmkit.distill import DistillConfig, distill

        out = distill(DistillConfig(student=str(work / "student"), teacher=str(work / "teacher"),
                                    data=str(train), task="summarize", out=str(work / "ours"),
                                    max_steps=args.steps, batch_size=args.batch_size,
                                    max_length=args.max_length, lr=1e-4, eval_every=10**9,
                                    save_every=10**9, device=args.device, restart=True))
        rec = json.loads((out / "training_record.json").read_text())
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        res = {"seconds": last["elapsed_s"], "tokens": last["tokens"],
               "activation_checkpointing": rec["activation_checkpointing"]}
    else:
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        msgs = [{"messages": [{"role": "user", "content": e.prompt},
                              {"role": "assistant", "content": e.answer}]} for e in examples]
        student, s_tok = models.load_model(str(work / "student"), device=args.device)
        teacher, _ = models.load_model(str(work / "teacher"), device=args.device)
        student.train()
        cfg = GKDConfig(output_dir=str(work / "trl"), lmbda=0.0, beta=0.0, temperature=1.0,
                        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                        max_steps=args.steps, max_length=args.max_length, learning_rate=1e-4,
                        logging_steps=10**6, save_strategy="no", report_to=[],
                        use_cpu=args.device == "cpu", bf16=bf16,
                        gradient_checkpointing=args.trl_checkpointing, dataloader_num_workers=0,
                        disable_dropout=True, seed=0)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg,
                             train_dataset=Dataset.from_list(msgs), processing_class=s_tok)
        res = {"seconds": float(trainer.train().metrics["train_runtime"]), "tokens": tokens,
               "activation_checkpointing": args.trl_checkpointing}
    res["peak_rss"] = peak_rss()
    if args.device == "cuda":
        res["cuda_peak"] = torch.cuda.max_memory_allocated()
    res["precision"] = "bf16 autocast" if bf16 else "float32"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--trl-checkpointing", action="store_true",
                    help="TRL with gradient checkpointing too (default: its default, off)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "slmkit-bench-scale"))
    ap.add_argument("--one", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.one:
        print(json.dumps(run_one(args.one, args, work)))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench/scale.py: TRL is not installed (`pip install trl`); ours only", file=sys.stderr)
        trainers = ["ours"]
    else:
        trainers = ["ours", "trl"]
    work.mkdir(parents=True, exist_ok=True)
    make_models(work)
    results = {}
    for which in trainers:
        cmd = [sys.executable, __file__, "--one", which, "--device", args.device, "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
               str(args.max_length), "--work", str(work)] + (["--trl-checkpointing"] if args.trl_checkpointing else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nteacher 1.24B (Llama-3.2-1B shape), student 0.31B, vocabulary 128,256; {args.steps} steps "
          f"x batch {args.batch_size}, max length {args.max_length}, {args.device}, "
          f"{results['ours']['precision']}\n")
    print("| trainer | activation checkpointing | seconds | tokens/s | peak RSS |" +
          (" CUDA peak |" if args.device == "cuda" else ""))
    print("|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for name, r in results.items():
        label = "slm distill" if name == "ours" else "TRL GKDTrainer"
        row = (f"| {label} | {'on' if r['activation_checkpointing'] else 'off'} | {r['seconds']:.1f} | "
               f"{r['tokens'] / r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} GiB |")
        if args.device == "cuda":
            row += f" {r['cuda_peak'] / 2**30:.2f} GiB |"
        print(row)
    if len(results) == 2:
        a, b = results["ours"], results["trl"]
        print(f"\nslm distill / TRL: {(a['tokens'] / a['seconds']) / (b['tokens'] / b['seconds']):.2f}x "
              f"tokens/s, {a['peak_rss'] / b['peak_rss']:.2f}x peak RSS")
    from slmkit import results as slm_results

    slm_results.write("scale", {"steps": args.steps, "batch_size": args.batch_size,
                                "max_length": args.max_length, "device": args.device, "trainers": results},
                      summary=", ".join(f"{'slm distill' if k == 'ours' else 'TRL'} "
                                        f"{r['tokens'] / r['seconds']:.1f} tokens/s, peak RSS "
                                        f"{r['peak_rss'] / 2**30:.2f} GiB" for k, r in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
