"""Does the offline teacher cache teach the right token? Each row's cached top-1 ids against the
teacher's own next-token argmax, computed one row at a time (no padding), on plain-text rows of
mixed lengths, then a short `--teacher-cache` distillation from that cache.

    python bench/cache_agreement.py                          # the precision path this machine picks
    SLMKIT_AUTOCAST=bf16 python bench/cache_agreement.py     # the path bf16 CPUs and GPUs take

Default settings of `slm distill --cache-teacher` (batch 8, max length 1024, k 32) on the first
16 DialogSum dev dialogues as {"text"} rows (every token counts, the first one included; the
left padding of a batch then sits right next to counted tokens). Prints per-row agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmkit import models, precision, results  # noqa: E402
from slmkit.distill import DistillConfig, cache_teacher, distill  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dialogsum-dev.jsonl"))
    ap.add_argument("--n", type=int, default=16, help="dialogues")
    ap.add_argument("--distill-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).is_file():
        print(f"{args.data} not found; pass --data", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in open(args.data)][:args.n]
    work = Path(tempfile.mkdtemp(prefix="cache-agreement-"))
    data = work / "plain.jsonl"
    data.write_text("".join(json.dumps({"text": r["dialogue"]}) + "\n" for r in rows))
    print(f"precision path: {precision.describe(models.pick_device(None))} "
          f"(SLMKIT_AUTOCAST={precision.mode()}); teacher {args.teacher}; {len(rows)} rows")

    t = time.perf_counter()
    cfg = DistillConfig(student=args.teacher, teacher=args.teacher, data=str(data), out=str(work / "x"))
    cache = load_file(str(cache_teacher(cfg, work / "topk.safetensors")))
    print(f"cache written in {time.perf_counter() - t:.1f} s (batch {cfg.batch_size}, "
          f"max length {cfg.max_length})")

    model, _ = models.load_model(args.teacher, device=models.pick_device(None))
    device = next(model.parameters()).device
    worst, total, agree = 1.0, 0, 0
    for key in sorted(k[:-len(".tokens")] for k in cache if k.endswith(".tokens")):
        ids = cache[f"{key}.tokens"].long()[None].to(device)
        with torch.no_grad(), precision.autocast(device):
            logits = model(ids).logits
        ref = logits[0, :-1].float().argmax(-1).cpu()
        top1 = cache[f"{key}.ids"][1:, 0].long()  # a row per token of the text: the first predicts none
        if top1.shape != ref.shape:
            print(f"{key}: {top1.shape[0]} cached positions, {ref.shape[0]} in the row")
            return 1
        ok = int((top1 == ref).sum())
        worst = min(worst, ok / len(ref))
        total, agree = total + len(ref), agree + ok
        print(f"{key}: {ids.shape[1]:5d} tokens, top-1 agreement {100 * ok / len(ref):5.1f} %")
    print(f"all rows: {100 * agree / total:.1f} % of {total} positions; worst row {100 * worst:.1f} %")

    t = time.perf_counter()
    out = distill(DistillConfig(student=args.teacher, teacher_cache=str(work / "topk.safetensors"),
                                data=str(data), out=str(work / "student"), max_steps=args.distill_steps,
                                batch_size=2, eval_every=10**6))
    rec = json.loads((out / "training_record.json").read_text())
    seconds = time.perf_counter() - t
    print(f"--teacher-cache distillation: {rec['steps']} steps in {seconds:.1f} s, "
          f"final kd {rec['final_train']['kd']:.4f}")
    results.write("cache_agreement", {
        "teacher": args.teacher, "rows": len(rows), "positions": total,
        "top1_agreement": agree / total, "worst_row": worst, "precision": precision.describe(device),
        "distill_steps": rec["steps"], "distill_s": round(seconds, 1), "final_kd": rec["final_train"]["kd"]},
        summary=f"cache top-1 agreement {100 * agree / total:.1f} % of {total} positions, "
                f"worst row {100 * worst:.1f} % ({precision.describe(device)})")
    return 0 if worst >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
