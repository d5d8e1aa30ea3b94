"""Benchmark `slm prune` on `default` (SmolLM2-135M-Instruct): importance against random and
against dropping the last layers, all at the same parameter budget.

    python bench/prune.py                          # --target 0.5, 64 calib + 64 eval rows of 256
    python bench/prune.py --target 0.7 --calib-seqs 32 --eval-seqs 32

DialogSum dev texts (../shared/data/dialogsum-dev.jsonl beside the repository, dialogue and
summary joined) are shuffled once and split in two halves: one half calibrates, the other
measures perplexity, so no evaluation text was seen by the importance pass. Rows, each at the
shape `slm prune` plans for that method and target:
  teacher; width / depth / both by importance; the same shapes with random importance scores
  (random heads, channels, hidden channels and layers); depth by dropping the last layers; and
  width / both by importance with `--refit` (each MLP's output projection refitted by least
  squares on the calibration rows, prune.refit_mlp()).
One importance pass (on the teacher) serves every row. No training after pruning: this measures
how much of the model each choice keeps, before distillation heals it.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit import data, models, results
from slmkit import prune as P

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def perplexity(model, ids, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over all tokens of ids (N, T)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            x = ids[start:start + batch_size]
            logits = model(x, use_cache=False).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def random_scores(scores: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) for k, v in scores.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(SHARED_DATA / "dialogsum-dev.jsonl"))
    ap.add_argument("--target", default="0.5")
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"skip: {args.data} not found (the shared DialogSum data sit beside the repository)")
        return 0

    t0 = time.time()
    folder = models.resolve(args.model)
    cfg, shapes = models.read_config(folder), P.header_shapes(folder)
    src = P.source_shape(cfg)
    total = models.describe_shapes(cfg, shapes)["parameters"]
    budget = P.parse_target(args.target, total)
    count = lambda s: P.count_params(cfg, shapes, s)  # noqa: E731
    plans = {m: P.plan_shape(src, count, budget, m) for m in P.METHODS}

    texts = data.calibration_texts(args.data)
    random.Random(args.seed).shuffle(texts)
    half = len(texts) // 2
    model, tok = models.load_folder(folder, device="cpu")
    calib = P.calibration_batch(tok, texts[:half], args.calib_seqs, args.seq_len, seed=args.seed)
    held = P.calibration_batch(tok, texts[half:], args.eval_seqs, args.seq_len, seed=args.seed)
    print(f"{args.model}: {total:,} parameters, target {budget:,}; calibration {tuple(calib.shape)}, "
          f"held-out {tuple(held.shape)} tokens from {Path(args.data).name}", file=sys.stderr)
    scores = P.measure_importance(model, calib)
    rand = random_scores(scores, args.seed + 1)
    last = dict(scores, block_influence=-torch.arange(src.layers, dtype=torch.float))  # keeps the first

    rows = [("teacher", src, total, perplexity(model, held))]
    print(f"teacher ppl {rows[0][3]:.2f}", file=sys.stderr)
    for name, method, s in [
        ("width, importance", "width", scores), ("width, random", "width", rand),
        ("depth, Block Influence", "depth", scores), ("depth, random layers", "depth", rand),
        ("depth, drop last layers", "depth", last),
        ("both, importance", "both", scores), ("both, random", "both", rand),
        ("width, importance, --refit", "width", scores), ("both, importance, --refit", "both", scores),
    ]:
        dst = plans[method]
        keep = P.select(s, src, dst)
        # every row gets the same RMSNorm correction, from the measured energies
        rescale = P.norm_rescale(scores, keep, src) if dst.hidden < src.hidden else None
        pruned = P.apply_plan(model, keep, dst, rescale)
        if name.endswith("--refit"):
            P.refit_mlp(model, pruned, keep, calib)
        n = models.count_parameters(pruned)
        assert n == count(dst), (n, count(dst))
        rows.append((name, dst, n, perplexity(pruned, held)))
        print(f"{name}: ppl {rows[-1][3]:.2f}", file=sys.stderr)
        del pruned

    print(f"\nslm prune on {args.model}, target {args.target} ({budget:,} parameters); held-out "
          f"perplexity on {held.shape[0]}x{held.shape[1]} DialogSum tokens, no retraining\n")
    print("| pruning | layers | hidden | ffn | heads/kv | parameters | ppl |")
    print("|---|---|---|---|---|---|---|")
    for name, s, n, ppl in rows:
        print(f"| {name} | {s.layers} | {s.hidden} | {s.ffn} | {s.heads}/{s.kv_heads} | "
              f"{n:,} ({100 * n / total:.1f}%) | {ppl:,.2f} |")
    print(f"\n({time.time() - t0:.0f} s on {torch.get_num_threads()} CPU threads)")
    results.write("prune", {
        "model": args.model, "target": args.target, "budget": budget, "parameters": total,
        "held_out_tokens": list(held.shape), "seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "rows": [{"name": name, "layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "heads": s.heads,
                  "kv_heads": s.kv_heads, "parameters": n, "ppl": ppl} for name, s, n, ppl in rows]},
        summary="held-out ppl, no retraining: " + ", ".join(f"{name} {ppl:,.1f}" for name, _, _, ppl in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
