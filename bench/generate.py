"""Benchmark `slm generate` on 100 DialogSum dev dialogues with the embedded default teacher.

    python bench/generate.py [--limit 100] [--max-new-tokens 60] [--single 8] [--work DIR]

1. Greedy single answers, decoded as left-padded batches of 16: ROUGE-L against the references,
   and generation tokens/s (over all batches, and for the first batch of 16 alone).
2. The first `--single` prompts decoded one at a time (single stream): tokens/s.
3. Best-of-4 (temperature 0.8, top-p 0.95) selected by the teacher-as-judge and the validators
   through `slmkit.generate.generate`. The references are removed from its input file, so the
   selection cannot peek at them; ROUGE-L is computed afterwards on the kept answers, next to
   greedy's on the same dialogues.

Results go to WORK/results.json after each stage; best-of-4 writes WORK/out.jsonl as it goes, so
a rerun with the same --work resumes it. Needs ../shared/data/dialogsum-dev.jsonl beside the
repository (skipped when absent).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum-dev.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--single", type=int, default=8, help="prompts decoded one at a time")
    p.add_argument("--teacher", default="default")
    p.add_argument("--work", help="folder for the generated data and results (default: a new temp folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 because on a shared machine 2 spinning threads per "
                        "process measured 6x slower")
    args = p.parse_args()
    if not DATA.is_file():
        print(f"skip: {DATA} not found", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", file=sys.stderr)

    def save(results):
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    from slmkit.backends import load_backend
    from slmkit.data import read_jsonl
    from slmkit.generate import GenerateConfig, generate, user
    from slmkit.metrics import rouge
    from slmkit import results as slm_results
    from slmkit.tasks import get_task

    task = get_task("summarize")
    rows = [r for _, r in read_jsonl(DATA)][: args.limit]
    refs = {r["fname"]: r["summary"] for r in rows}
    prompts = [user(task.prompt(r)) for r in rows]
    backend = load_backend(args.teacher)
    results = {"teacher": args.teacher, "dialogues": len(rows), "max_new_tokens": args.max_new_tokens}

    # 1. greedy, batched by 16
    greedy_file = work / "greedy.json"
    if greedy_file.is_file():
        greedy = json.loads(greedy_file.read_text())
        results |= json.loads((work / "results.json").read_text())
    else:
        greedy, toks, secs = {}, 0, 0.0
        for i in range(0, len(rows), 16):
            t0 = time.perf_counter()
            comps = backend.generate(prompts[i:i + 16], max_tokens=args.max_new_tokens, temperature=0.0)
            dt = time.perf_counter() - t0
            if i == 0:
                results["batched_16_tokens_per_s_first_batch"] = round(
                    sum(c.completion_tokens for c in comps) / dt, 1)
            secs += dt
            toks += sum(c.completion_tokens for c in comps)
            greedy.update({r["fname"]: c.text.strip() for r, c in zip(rows[i:i + 16], comps)})
            print(f"greedy {min(i + 16, len(rows))}/{len(rows)}: {toks / secs:.1f} tokens/s", file=sys.stderr)
        results["greedy_batched_tokens_per_s"] = round(toks / secs, 1)
        results["greedy_rougeL_all"] = round(
            rouge(list(greedy.values()), [[refs[k]] for k in greedy])["rougeL"], 4)

        # 2. single stream on the first prompts (the batch of 16 above holds them too)
        n1 = min(args.single, len(rows))
        t0 = time.perf_counter()
        one = [backend.generate([pr], max_tokens=args.max_new_tokens, temperature=0.0)[0]
               for pr in prompts[:n1]]
        results[f"single_stream_tokens_per_s_{n1}_prompts"] = round(
            sum(c.completion_tokens for c in one) / (time.perf_counter() - t0), 1)
        results["batched_over_single"] = round(results["batched_16_tokens_per_s_first_batch"]
                                               / results[f"single_stream_tokens_per_s_{n1}_prompts"], 2)
        results["single_same_as_batched_text"] = sum(
            c.text.strip() == greedy[r["fname"]] for c, r in zip(one, rows))
        greedy_file.write_text(json.dumps(greedy))
        save(results)
    del backend
    print(json.dumps(results), file=sys.stderr)

    # 3. best-of-4 through slm generate, the references kept out of its inputs
    inputs = work / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": r["fname"], "dialogue": r["dialogue"]}) + "\n" for r in rows))
    cfg = GenerateConfig(teacher=args.teacher, task="summarize", inputs=str(inputs),
                         out=str(work / "out.jsonl"), n=4, temperature=0.8, top_p=0.95,
                         max_new_tokens=args.max_new_tokens, batch_size=16)
    stats = generate(cfg)
    kept = {r["id"]: r["summary"] for _, r in read_jsonl(cfg.out)}
    judged = [r["meta"]["scores"]["judge"] for _, r in read_jsonl(cfg.out)]
    ids = list(kept)
    results["best_of_4"] = {k: stats[k] for k in ("kept", "dropped", "candidates_rejected", "tokens_per_s",
                                                  "generation_seconds", "judge_seconds", "judge",
                                                  "judge_unclear", "thresholds")}
    results["best_of_4_rougeL_kept"] = round(rouge([kept[k] for k in ids], [[refs[k]] for k in ids])["rougeL"], 4)
    results["greedy_rougeL_same_kept"] = round(rouge([greedy[k] for k in ids], [[refs[k]] for k in ids])["rougeL"], 4)
    results["mean_judge_score_kept"] = round(sum(j for j in judged if j is not None)
                                             / max(1, sum(j is not None for j in judged)), 4)
    save(results)
    print(json.dumps(results, indent=2))
    slm_results.write("generate", results, summary=(
        f"best-of-4 ROUGE-L {100 * results['best_of_4_rougeL_kept']:.1f} vs greedy "
        f"{100 * results['greedy_rougeL_same_kept']:.1f} on the kept inputs"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
