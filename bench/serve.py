"""Benchmark `slm serve`: load, single-stream decode speed against llama-cpp-python, and student
vs teacher. Run it once, on a quiet machine if you can:

    python bench/serve.py                                  # `default` (PyTorch) + its GGUF
    python bench/serve.py --student runs/demo/student      # ... and student vs teacher

1. Load: --clients concurrent clients (official openai client) x --requests each against the
   server serving --teacher with the PyTorch backend (static batching); errors, p50/p95 latency,
   aggregate completion tokens/s, and the batch sizes the server formed.
2. Single stream: decode tokens/s (tokens after the first / time after the first) of `slm serve`
   (its own process) serving a GGUF with llama.cpp, streamed over HTTP, against llama-cpp-python
   called directly on the same file with the same threads; also whole non-streamed requests
   (prefill included). Runs interleaved, median of --reps. The GGUF is `default` exported to
   q8_0 by `slmkit.export` when that works, else the embedded Q4_1 file.
3. Student vs teacher (with --student): single-stream latency and decode tokens/s of each over
   the same prompts, both served by one server with the PyTorch backend.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Summarize: Person1: Are you coming to the party tonight? Person2: Yes, I will bring snacks.",
    "Correct the grammar: he have three cat and two dogs at home.",
    "Suggest a short reply to: Can you send me the report before the meeting tomorrow?",
    "Write one sentence about the sea.",
    "List three fruits.",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Translate to French: good morning.",
]
LONG_PROMPT = "Write a long story about a lighthouse keeper and a storm."


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load_test(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    lat, toks, errors = [], [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        barrier.wait()
        for j in range(requests):
            t0 = time.perf_counter()
            try:
                r = c.chat.completions.create(
                    model=model, max_tokens=max_tokens, temperature=0.7, seed=i * 100 + j,
                    messages=[{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}])
                with lock:
                    lat.append(time.perf_counter() - t0)
                    toks.append(r.usage.completion_tokens)
            except Exception as e:  # counted, not raised: the point is to count them
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": clients * requests, "errors": len(errors), "first_error": errors[:1],
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "wall_s": wall,
            "completion_tokens": sum(toks), "tokens_per_s": sum(toks) / wall}


def stream_decode(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """(decode tokens/s, completion tokens, total seconds) of one streamed completion; decode
    speed counts the tokens after the first over the time after the first."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for ch in c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                   stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].text:
            last = time.perf_counter()
            first = first or last
        if ch.usage:
            n = ch.usage.completion_tokens
    tps = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return tps, n, time.perf_counter() - t0


def direct_decode(llm, prompt: str, max_tokens: int) -> tuple[float, int]:
    first = last = None
    n = 0
    for ch in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
        if ch["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
            n += 1
    # llama-cpp-python yields one chunk per token here (ASCII text); n counts them
    return ((n - 1) / (last - first) if n > 1 else 0.0), n


def serve_subprocess(model: str, *flags: str):
    """`slm serve MODEL` in its own process (as a user runs it: the client's Python does not
    share the server's GIL); returns (process, url)."""
    import re
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", model, "--port", "0", *flags],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
            return p, m.group(1)
    raise RuntimeError(f"slm serve {model} did not start (exit code {p.wait()})")


def whole_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(completion tokens / total seconds, tokens) of one non-streamed completion."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    r = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.usage.completion_tokens / (time.perf_counter() - t0), r.usage.completion_tokens


def direct_whole(llm, prompt: str, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
    return r["usage"]["completion_tokens"] / (time.perf_counter() - t0), r["usage"]["completion_tokens"]


def bench_gguf(gguf: Path, reps: int, max_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    from slmkit.backends.llamacpp import render_chat

    llm = Llama(model_path=str(gguf), n_ctx=0, n_threads=threads, verbose=False)
    # the same text for both sides: the chat template rendered once, sent as a plain prompt
    special = lambda t: llm.detokenize([t], special=True).decode()  # noqa: E731
    prompt = render_chat(llm.metadata["tokenizer.chat_template"],
                         [{"role": "user", "content": LONG_PROMPT}],
                         bos=special(llm.token_bos()), eos=special(llm.token_eos()))
    runs = {k: [] for k in ("ours_stream", "direct_stream", "ours_whole", "direct_whole")}
    tokens = {}
    proc, url = serve_subprocess(str(gguf), "--name", "gguf", "--threads", str(threads))
    try:
        stream_decode(url, "gguf", prompt, 8)  # warm-up both
        direct_decode(llm, prompt, 8)
        for _ in range(reps):  # interleaved so machine load hits both alike
            tps, tokens["ours"], _ = stream_decode(url, "gguf", prompt, max_tokens)
            runs["ours_stream"].append(tps)
            tps, tokens["direct"] = direct_decode(llm, prompt, max_tokens)
            runs["direct_stream"].append(tps)
            runs["ours_whole"].append(whole_request(url, "gguf", prompt, max_tokens)[0])
            runs["direct_whole"].append(direct_whole(llm, prompt, max_tokens)[0])
    finally:
        proc.terminate()
        proc.wait()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"threads": threads, "tokens": tokens, "median": med, "runs": runs}


def export_default(tmp: Path) -> Path:
    from slmkit import models

    try:
        from slmkit.export import export_gguf

        return export_gguf("default", tmp / "default.q8_0.gguf", quant="q8_0")
    except Exception as e:  # the bench still measures the engine on the shipped file
        print(f"export failed ({type(e).__name__}: {e}); using the embedded Q4_1 GGUF", file=sys.stderr)
        return models.default_gguf()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--student", default=None)
    ap.add_argument("--gguf", default=None, help="GGUF for the single-stream test (default: export `default`)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16, help="per request in the load test")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128, help="per single-stream run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads, both sides")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch threads (1 is much faster on a CPU busy with other work)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["load", "gguf", "student"])
    args = ap.parse_args()

    import torch

    from slmkit import results
    from slmkit.serve import start_server

    record, summary = {"teacher": args.teacher, "student": args.student}, []
    if "load" not in args.skip:
        with start_server([args.teacher], names=["teacher"], max_batch=args.max_batch,
                          batch_window_ms=20, timeout=900, threads=args.torch_threads) as s:
            r = load_test(s.url, "teacher", args.clients, args.requests, args.max_tokens)
            sizes = s.service.batchers["teacher"].batch_sizes
        mean_batch = sum(n * k for n, k in sizes.items()) / max(1, sum(sizes.values()))
        print(f"\n== load: {args.clients} clients x {args.requests} requests, max_tokens "
              f"{args.max_tokens}, `{args.teacher}` (PyTorch, static batching, max batch "
              f"{args.max_batch}, torch threads {torch.get_num_threads()})")
        print(f"requests {r['requests']}  errors {r['errors']} {r['first_error']}")
        print(f"latency p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s  wall {r['wall_s']:.1f} s")
        print(f"aggregate {r['tokens_per_s']:.1f} completion tokens/s ({r['completion_tokens']} tokens); "
              f"mean batch {mean_batch:.1f}, largest {max(sizes) if sizes else 0}")
        record["load"] = r | {"clients": args.clients, "requests_each": args.requests,
                              "max_tokens": args.max_tokens, "mean_batch": mean_batch}
        summary.append(f"load {args.clients} clients: {r['tokens_per_s']:.1f} tokens/s, p95 {r['p95_s']:.2f} s")

    if "gguf" not in args.skip:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("\n== single stream: skipped (llama-cpp-python is not installed)")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                gguf = Path(args.gguf) if args.gguf else export_default(Path(tmp))
                g = bench_gguf(gguf, args.reps, args.decode_tokens, args.threads)
            m = g["median"]
            record["gguf"] = g | {"file": gguf.name}
            summary.append(f"slm serve / llama-cpp-python decode {100 * m['ours_stream'] / m['direct_stream']:.1f} %")
            print(f"\n== single stream, {gguf.name}, {g['threads']} llama.cpp threads, "
                  f"{g['tokens']['ours']} / {g['tokens']['direct']} tokens, median of {args.reps}")
            print(f"decode (streamed, after the first token): slm serve {m['ours_stream']:.1f} tokens/s, "
                  f"llama-cpp-python direct {m['direct_stream']:.1f} tokens/s, "
                  f"ratio {100 * m['ours_stream'] / m['direct_stream']:.1f} % (goal >= 95 %)")
            print(f"whole request (prefill included):       slm serve {m['ours_whole']:.1f} tokens/s, "
                  f"llama-cpp-python direct {m['direct_whole']:.1f} tokens/s, "
                  f"ratio {100 * m['ours_whole'] / m['direct_whole']:.1f} %")
            best = {k: max(v) for k, v in g["runs"].items()}
            print(f"best of {args.reps} (least disturbed by other work): decode ratio "
                  f"{100 * best['ours_stream'] / best['direct_stream']:.1f} %, whole-request ratio "
                  f"{100 * best['ours_whole'] / best['direct_whole']:.1f} %")
            for k, v in g["runs"].items():
                print(f"  {k:14s}", " ".join(f"{x:.1f}" for x in v))

    if args.student and "student" not in args.skip:
        with start_server([args.teacher, args.student], names=["teacher", "student"], timeout=900,
                          threads=args.torch_threads) as s:
            print(f"\n== student vs teacher (PyTorch, single stream, {len(PROMPTS)} prompts, "
                  f"{args.decode_tokens} tokens max)")
            for name in ("teacher", "student"):
                stream_decode(s.url, name, PROMPTS[0], 4)  # warm-up
                runs = [stream_decode(s.url, name, p, args.decode_tokens) for p in PROMPTS]
                # pooled over the prompts: answers of a few tokens make per-run rates noisy
                tokens, seconds = sum(r[1] for r in runs), sum(r[2] for r in runs)
                lat = statistics.median(r[2] for r in runs)
                print(f"{name:8s} {tokens / seconds:.1f} tokens/s over whole requests "
                      f"({tokens} tokens in {seconds:.1f} s)   median latency {lat:.2f} s")
                record.setdefault("student_vs_teacher", {})[name] = {
                    "tokens": tokens, "seconds": seconds, "median_latency_s": lat}
    results.write("serve", record, summary="; ".join(summary) or "(no part run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
