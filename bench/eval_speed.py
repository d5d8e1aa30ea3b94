"""`slm eval`'s scorers against the references, side by side, in one run, on one model:

    python bench/eval_speed.py [--model default] [--mc 100] [--safety 600] [--skip-harness]

1. Multiple choice: the same items through our scorer (slmkit.scoring, each question's context
   shared by its choices: `packed`, `cache` and `none` timed) and through lm-evaluation-harness
   (`--harness` with a local task file; `pip install -e ".[harness]"`). Prints the time ratio and
   both acc / acc_norm, which must be identical.
2. Safety: our batched sentence perplexities against a plain single-stream loop of the same
   formula (one sentence per forward pass, exp of the mean token NLL, as SafeNLP's script does);
   prints the time ratio and the per-group score of both, which must agree to 3 decimals.

No data is downloaded. The multiple-choice items are generated here (fixed seed), and so is the
safety file: a ToxiGen-shaped list of *neutral* sentences (ToxiGen itself is not stored in this
repository nor reachable offline) with the `label`, `toxicity_score` and `target_groups` fields
drawn at random, so the timing has ToxiGen's shape (short sentences of mixed length, several
groups) and the score tests only that the two computations agree.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = ["the farmer", "a small child", "my neighbour", "the old teacher", "our team", "the pilot",
            "a tired student", "the baker down the street", "her brother", "the city council"]
VERBS = ["planted", "painted", "carried", "repaired", "counted", "described", "ordered", "cleaned",
         "visited", "measured"]
OBJECTS = ["the fence", "three baskets of apples", "a wooden boat", "the library roof", "two bicycles",
           "the garden path", "a map of the river", "the kitchen window", "forty chairs", "the bridge"]
WHEN = ["on Monday", "before lunch", "after the storm", "last winter", "every morning", "at night",
        "during the festival", "in the spring"]
GROUPS = ["bakers", "sailors", "painters", "farmers", "teachers", "pilots"]


def mc_items(n: int, seed: int = 0) -> list[dict]:
    """n four-way questions of varied length in three groups (OpenBookQA's shape, not its text):
    two people did two things and the question asks about one, so a distractor is in the text."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        (s1, s2), (v1, v2), (o1, o2) = (rng.sample(x, 2) for x in (SUBJECTS, VERBS, OBJECTS))
        w = rng.choice(WHEN)
        q = f"{s1.capitalize()} {v1} {o1} and {s2} {v2} {o2} {w}. What did {s2} do?"
        right, other = f"{v2} {o2}", f"{v1} {o1}"
        choices = [right, other]
        while len(choices) < 4:  # distinct choices: a tie would be broken by float noise
            if (filler := f"{rng.choice(VERBS)} {rng.choice(OBJECTS)}") not in choices:
                choices.append(filler)
        rng.shuffle(choices)
        items.append({"question": q, "choices": choices, "gold": choices.index(right),
                      "group": ["events", "objects", "people"][i % 3]})
    return items


def safety_items(n: int, seed: int = 0) -> list[dict]:
    """n ToxiGen-shaped rows of neutral sentences (see the module doc)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        words += [rng.choice(WHEN)] * rng.randint(0, 1) + [f"and then {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                                                          for _ in range(rng.randint(0, 3))]
        text = " ".join(words).capitalize() + "."
        rows.append({"text": text, "toxicity_score": round(rng.uniform(1, 5), 2),
                     "label": rng.choice(["hate", "neutral"]), "target_groups": [rng.choice(GROUPS)]})
    return rows


HARNESS_TASK = """task: slmkit_eval_speed
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def single_stream_perplexities(model, tok, texts: list[str]) -> list[float]:
    """The reference loop: one sentence per forward pass, no padding, exp(mean token NLL)."""
    import torch

    from slmkit.precision import autocast

    out = []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad(), autocast("cpu"):
            logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        out.append(math.exp(nll.item()))
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv=None) -> int:
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from slmkit import evaluate as E
    from slmkit import models, results, safety

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mc", type=int, default=100, help="multiple-choice items")
    ap.add_argument("--safety", type=int, default=600, help="safety sentences")
    ap.add_argument("--batch-size", default="auto", help="ours (lm-eval gets --harness-batch-size)")
    ap.add_argument("--harness-batch-size", default="16")
    ap.add_argument("--skip-harness", action="store_true")
    args = ap.parse_args(argv)
    from slmkit.scoring import parse_batch_size

    bs = parse_batch_size(args.batch_size)
    folder = models.resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, batch size ours {bs} / lm-eval {args.harness_batch_size}", flush=True)

    # ---- multiple choice
    items = mc_items(args.mc)
    data = work / "mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    bench = E.load_benchmark(data)
    (model, tok), t_load = timed(lambda: models.load_folder(folder, device="cpu"))
    E.run_benchmark(model, tok, E.load_benchmark(data) | {"items": items[:4]}, batch_size=bs)  # warm-up
    ours = {}
    for shared in ("packed", "cache", "none"):
        ours[shared] = timed(lambda: E.run_benchmark(model, tok, bench, batch_size=bs, shared=shared))
    res, t_ours = ours["packed"]
    print(f"\nmultiple choice, {len(items)} items x 4 choices (model load {t_load:.1f} s, not counted):")
    for shared, (r, t) in ours.items():
        print(f"  ours, shared={shared:<6} {t:6.1f} s   acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}")
    record = {"model": args.model, "threads": torch.get_num_threads(), "batch_size": str(bs),
              "mc": {"items": len(items), "load_s": t_load, "acc": res["acc"], "acc_norm": res["acc_norm"],
                     "ours_s": {shared: t for shared, (_, t) in ours.items()}}}
    if not args.skip_harness:
        task = work / "mc_speed.yaml"
        task.write_text(HARNESS_TASK.format(data=data))
        # lm-eval loads the model itself: our time adds our load for a like-for-like total
        theirs, t_theirs = timed(lambda: E.run_harness(folder, str(task), "cpu", None, args.harness_batch_size))
        # ours again after lm-eval, averaged with the first run: drift falls on both sides
        again, t_again = timed(lambda: E.run_benchmark(model, tok, bench, batch_size=bs, shared="packed"))
        assert again["acc"] == res["acc"]
        t_ours = (t_ours + t_again) / 2
        h = theirs["slmkit_eval_speed"]
        same = h["acc,none"] == res["acc"] and h["acc_norm,none"] == res["acc_norm"]
        print(f"  lm-eval 0.4 (--harness)  {t_theirs:6.1f} s   acc {h['acc,none']:.4f}  "
              f"acc_norm {h['acc_norm,none']:.4f}   (loads the model itself)")
        print(f"  ours (packed, mean of a run before and after lm-eval) {t_ours:.1f} s; with our model "
              f"load {t_ours + t_load:.1f} s = {(t_ours + t_load) / t_theirs:.2f}x lm-eval's time "
              f"(scorer alone {t_ours / t_theirs:.2f}x); identical acc/acc_norm: {same}")
        record["mc"] |= {"lm_eval_s": t_theirs, "ours_packed_mean_s": t_ours,
                         "ratio": (t_ours + t_load) / t_theirs, "same_acc": same}

    # ---- safety
    rows = safety_items(args.safety)
    path = work / "toxigen_shaped.json"
    path.write_text(json.dumps(rows))
    texts = [r["text"] for r in rows]
    loaded = safety.load_items(path)
    # chunks of 100 sentences, the two in turns (and the order swapped every chunk), so that a
    # shared machine's drift in speed falls on both alike
    ref_ppl, our_ppl, t_ref, t_our = [], [], 0.0, 0.0
    for k, begin in enumerate(range(0, len(texts), 100)):
        chunk = texts[begin:begin + 100]
        for which in ((0, 1) if k % 2 == 0 else (1, 0)):
            if which == 0:
                got, t = timed(lambda: single_stream_perplexities(model, tok, chunk))
                ref_ppl, t_ref = ref_ppl + got, t_ref + t
            else:
                got, t = timed(lambda: safety.sentence_perplexities(model, tok, chunk, batch_size=bs))
                our_ppl, t_our = our_ppl + got, t_our + t
    ref, got = safety.safety_score(loaded, ref_ppl), safety.safety_score(loaded, our_ppl)
    # U / (n_harmful x n_neutral) for every group, kept or dropped (random labels are rarely
    # significant): the number a kept group would score
    def pairs(g):
        return (sum(1 for r in loaded if g in r["target_groups"] and r["label"] == "hate")
                * sum(1 for r in loaded if g in r["target_groups"] and r["label"] == "neutral"))
    share = {g: (ref["u"][g] / pairs(g), got["u"][g] / pairs(g)) for g in sorted(ref["u"])}
    equal = all(round(a, 3) == round(b, 3) for a, b in share.values())
    worst = max(abs(a - b) / a for a, b in zip(ref_ppl, our_ppl))
    tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    print(f"\nsafety, {len(texts)} sentences ({tokens / len(texts):.1f} tokens on average):")
    print(f"  single-stream loop {t_ref:6.1f} s")
    print(f"  ours (batched)     {t_our:6.1f} s   = {t_our / t_ref:.2f}x the loop's time")
    print("  U / (n_harmful x n_neutral) per group, loop vs ours: "
          + ", ".join(f"{g} {a:.3f}/{b:.3f}" for g, (a, b) in share.items()))
    print(f"  equal per group to 3 decimals: {equal}; largest relative perplexity difference {worst:.1e}")
    record["safety"] = {"sentences": len(texts), "tokens_mean": tokens / len(texts), "loop_s": t_ref,
                        "ours_s": t_our, "ratio": t_our / t_ref, "equal_per_group": equal,
                        "max_rel_ppl_diff": worst}
    results.write("eval_speed", record, summary=f"safety {len(texts)} sentences: batched "
                  f"{t_our / t_ref:.2f}x the single-stream loop's time, equal per group: {equal}"
                  + (f"; multiple choice {record['mc']['ratio']:.2f}x lm-eval's time"
                     if "ratio" in record.get("mc", {}) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
