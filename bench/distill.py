"""Does distillation help? Three students, the same data and the same token budget:

    (a) KD from the pruned init      teacher `default`, forward KL, tau = 1
    (b) CE only from the pruned init  plain fine-tuning on the reference summaries, no teacher
    (c) KD from a random init         same shape as the pruned model, same teacher

    python bench/distill.py                                  # prunes `default` to 50 % first
    python bench/distill.py --student pruned/ --tokens 20000 --threads 1

Data: ../shared/data/dialogsum-dev.jsonl as `summarize` pairs (dialogue -> summary); the last
--eval-n dialogues are held out. Reported per model: held-out answer perplexity (teacher-forced
on the reference summaries) and ROUGE-L F1 x 100 of greedy summaries of those dialogues. The
teacher and the untrained pruned model are listed for reference. The token budget counts prompt
and answer tokens the student reads (as `slm distill --max-tokens`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from slmkit import data, models, results
from slmkit.distill import DistillConfig, collate, distill, encode_all, logits_window
from slmkit.losses import loss_sums
from slmkit.tasks import get_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_split(src: Path, dest: Path, eval_n: int) -> None:
    rows = [row for _, row in data.read_jsonl(src)]
    with models.atomic_write(dest) as f:  # rows may run in parallel processes that read it
        for i, row in enumerate(rows):
            keep = {"dialogue": row["dialogue"], "summary": row["summary"]}
            f.write(json.dumps(keep | ({"split": "eval"} if i >= len(rows) - eval_n else {})) + "\n")


def answer_ppl(model, tok, items, batch_size: int = 8) -> float:
    """exp(mean CE) over the reference answer tokens of `items` (Encoded)."""
    ce = n = 0.0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            ids, att, mask, pos = collate(items[i:i + batch_size], tok.pad_token_id)
            logits, labels, tmask, _ = logits_window(model, ids, att, mask, pos)
            _, c, m = loss_sums(logits, labels, tmask)
            ce, n = ce + float(c), n + m
    return math.exp(ce / n)


def rouge_l(model, tok, examples, max_new_tokens: int, batch_size: int = 10) -> tuple[float, list[str]]:
    """Mean ROUGE-L F1 x 100 of greedy outputs against the references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    outs, scores = [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [tok(data.chat_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"]
                   for ex in chunk]
        ids, att = data.pad_batch(prompts, tok.pad_token_id, side="left")
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=att, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for ex, row in zip(chunk, gen[:, ids.shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True).strip()
            outs.append(text)
            scores.append(scorer.score(ex.answer, text)["rougeL"].fmeasure)
    return 100 * sum(scores) / len(scores), outs


def score(folder, held_ex, max_new_tokens: int) -> dict:
    model, tok = models.load_model(folder, device="cpu")
    items = encode_all([(i, ex) for i, ex in enumerate(held_ex)], tok, 1024)
    t0 = time.perf_counter()
    ppl = answer_ppl(model, tok, items)
    rl, outs = rouge_l(model, tok, held_ex, max_new_tokens)
    return {"answer_ppl": ppl, "rougeL": rl, "parameters": models.count_parameters(model),
            "eval_s": round(time.perf_counter() - t0, 1), "sample": outs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="the pruned student (else `default` is pruned to --target)")
    ap.add_argument("--target", default="0.5", help="prune target when --student is not given")
    ap.add_argument("--tokens", type=int, default=50_000, help="token budget per arm")
    ap.add_argument("--eval-n", type=int, default=30, help="held-out dialogues")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy box)")
    ap.add_argument("--only", default="teacher,pruned,a,b,c",
                    help="rows to compute now (comma list); the table shows every row computed so "
                         "far in --work, so rows can run in parallel processes")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "slmkit-bench-distill"),
                    help="folder for the runs (finished arms are reused on rerun)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    src = SHARED / "dialogsum-dev.jsonl"
    if not src.is_file():
        print(f"bench/distill.py: {src} not found (../shared/data from the repository)", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "dialogsum.jsonl"
    write_split(src, train_file, args.eval_n)
    task = get_task("summarize")
    held_ex = [data.to_example(row, f"{train_file}:{n}", task, need_answer=True)
               for n, row in data.read_jsonl(train_file) if row.get("split") == "eval"]

    pruned = Path(args.student) if args.student else work / "pruned"
    if not args.student and not (pruned / "config.json").is_file():
        try:
            from slmkit.prune import PruneConfig, prune
        except ImportError:
            print("bench/distill.py: slmkit.prune is not available; run "
                  "`slm prune default --target 0.5 --calib ../shared/data/dialogsum-dev.jsonl "
                  "--out pruned` and pass --student pruned", file=sys.stderr)
            return 2
        prune(PruneConfig("default", pruned, target=args.target, calib=train_file))

    random_init = work / "random-init"
    if not (random_init / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = AutoConfig.from_pretrained(pruned)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # HF's own init
        models.save_model(model, models.load_tokenizer(pruned), random_init)

    common = dict(data=str(train_file), task="summarize", max_tokens=args.tokens, lr=args.lr,
                  batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=0.1,
                  eval_every=10**9, save_every=10**9, eval_max=2, device="cpu", resume=True)
    # the loop's own eval (4 held-out lines, at start and end) is only a sanity check; the table
    # below scores all --eval-n held-out dialogues the same way for every model
    arms = {
        "(a) KD, pruned init": DistillConfig(student=str(pruned), teacher="default",
                                             out=str(work / "kd-pruned"), **common),
        "(b) CE only, pruned init": DistillConfig(student=str(pruned), teacher=None, alpha_ce=1.0,
                                                  out=str(work / "ce-pruned"), **common),
        "(c) KD, random init": DistillConfig(student=str(random_init), teacher="default",
                                             out=str(work / "kd-random"), **common),
    }
    only = set(args.only.split(","))
    rows_dir = work / "results"
    rows_dir.mkdir(exist_ok=True)
    for key, name, folder in (("teacher", "teacher (default)", "default"),
                              ("pruned", "pruned init, untrained", str(pruned))):
        if key in only:
            row = score(folder, held_ex, args.max_new_tokens)
            (rows_dir / f"{key}.json").write_text(json.dumps({"name": name} | row))
            print(name, json.dumps(row), flush=True)
    for key, (name, cfg) in zip("abc", arms.items()):
        if key not in only:
            continue
        t0 = time.perf_counter()
        out = distill(cfg)
        record = json.loads((out / "training_record.json").read_text())
        row = score(out, held_ex, args.max_new_tokens) | {
            "train_tokens": record["tokens"], "steps": record["steps"],
            "train_s": record["time_s"], "wall_s": round(time.perf_counter() - t0, 1)}
        (rows_dir / f"{key}.json").write_text(json.dumps({"name": name} | row))
        print(name, json.dumps(row), flush=True)

    results_rows = {}
    for k in ("teacher", "pruned", "a", "b", "c"):
        if (rows_dir / f"{k}.json").is_file():
            r = json.loads((rows_dir / f"{k}.json").read_text())
            results_rows[r["name"]] = r
    print(f"\n{len(held_ex)} held-out dialogues, {args.tokens:,} training tokens per arm, "
          f"lr {args.lr}, batch {args.batch_size}, threads {torch.get_num_threads()}\n")
    print("| model | params | answer ppl | ROUGE-L | train tokens | train s |")
    print("|---|---|---|---|---|---|")
    for name, r in results_rows.items():
        print(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['answer_ppl']:.2f} | {r['rougeL']:.1f} | "
              f"{r.get('train_tokens', '-')} | {r.get('train_s', '-')} |")
    results.write("distill", {"held_out": len(held_ex), "tokens_per_arm": args.tokens, "lr": args.lr,
                              "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                              "rows": results_rows},
                  summary="; ".join(f"{n}: ROUGE-L {r['rougeL']:.1f}, ppl {r['answer_ppl']:.2f}"
                                    for n, r in results_rows.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
