"""What a model costs to run: parameters, bytes on disk, peak memory, time to first token,
prefill and decode tokens/s (one stream and a batch), request latency p50/p95, energy per token.

Each model is measured in its own Python process (`measure_in_subprocess`), so peak RSS belongs
to that model alone. A "typical request" is a 128-token prompt answered with 32 greedy tokens.

    python -m slmkit.speed MODEL_FOLDER [--engine torch|llamacpp] [--device cpu] --json

Energy: read from RAPL (/sys/class/powercap/intel-rapl*) when the machine exposes it to this
user; otherwise estimated as CPU-seconds x WATTS_PER_CORE and marked `energy_estimated: true`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slmkit.errors import UsageError

WATTS_PER_CORE = 10.0
"""Assumed power of one busy CPU core (W) for the energy estimate when RAPL is unreadable:
roughly a laptop or server core under full load (a 65-150 W package over 8-16 cores)."""

# A neutral text to cut prompts from: the workload, not its content, is what is timed.
PROMPT_TEXT = ("#Person1#: Hello, could you tell me when the next train to the city leaves? "
               "#Person2#: Sure, the next one leaves at half past ten from platform four. "
               "#Person1#: Thank you. Do I need to buy a ticket before I get on? "
               "#Person2#: Yes, the machine by the entrance takes cards and cash. ") * 20


def require_llamacpp():
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("--engine llamacpp needs llama-cpp-python: `pip install llama-cpp-python` "
                         "(or `pip install slmkit[llamacpp]`)") from None
    return llama_cpp


def measure_in_subprocess(path, engine: str = "torch", device: str = "cpu", **kwargs) -> dict:
    """Run `measure` in a fresh interpreter and return its dict (peak RSS is that process's)."""
    cmd = [sys.executable, "-m", "slmkit.speed", str(path), "--engine", engine, "--device", device, "--json"]
    for k, v in kwargs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    print(f"slm eval: measuring speed of {path} ({engine}, {device})", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = _relay(proc.stderr.fileno())  # the child's progress bar shows as it runs
    stdout = proc.stdout.read().decode()
    proc.wait()
    if proc.returncode != 0:
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
        last = (lines or ["no output"])[-1]
        if proc.returncode == UsageError.exit_code:
            raise UsageError(last.removeprefix("error: "))
        raise RuntimeError(f"speed measurement of {path} failed (exit {proc.returncode}): {last}")
    return json.loads(stdout.strip().splitlines()[-1])


def _relay(fd: int) -> str:
    """Copy a child's stderr to ours as it arrives (os.read returns what is there, so a
    progress bar's carriage-return updates pass at once); returns all of it."""
    chunks = []
    while data := os.read(fd, 4096):
        text = data.decode("utf-8", "replace")
        chunks.append(text)
        sys.stderr.write(text)
        sys.stderr.flush()
    return "".join(chunks)


def measure(path, engine: str = "torch", device: str = "cpu", prompt_tokens: int = 128,
            new_tokens: int = 32, requests: int = 5, batch: int = 8) -> dict:
    """Measure one model in this process (see measure_in_subprocess for per-model memory)."""
    if new_tokens < 2 or prompt_tokens < 1 or requests < 1 or batch < 1:
        raise UsageError("speed: --new-tokens must be >= 2 and the other sizes >= 1")
    baseline = peak_rss_bytes()
    load_before = os.getloadavg()[0]
    if engine == "llamacpp":
        out = _measure_llamacpp(Path(path), prompt_tokens, new_tokens, requests)
    else:
        out = _measure_torch(Path(path), device, prompt_tokens, new_tokens, requests, batch)
    return out | {"engine": engine, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                  "requests": requests, "peak_rss_bytes": peak_rss_bytes(),
                  "baseline_rss_bytes": baseline,
                  # other jobs on the same cores slow every engine, llama.cpp's spin-waiting
                  # threads most (4 tokens/s instead of 46 seen here): the report says so
                  "load_average": round(max(load_before, os.getloadavg()[0]), 2),
                  "cores": usable_cores()}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the current address space; getrusage's
    ru_maxrss would carry the parent's peak across fork + exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def summarize(ttfts: list[float], decode_steps: list[list[float]], prompt_tokens: int) -> dict:
    """Timings of single-stream requests -> the reported figures (seconds, tokens/s).
    ttfts: per request, prompt in -> first token out; decode_steps: per request, each later
    token's time."""
    latencies = sorted(t + sum(s) for t, s in zip(ttfts, decode_steps))
    ttft = statistics.median(ttfts)
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt_tokens / ttft,
        "decode_tokens_per_s": statistics.median(len(s) / sum(s) for s in decode_steps),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class EnergyMeter:
    """Joules spent between start() and stop(): RAPL counters when readable, else CPU-seconds x
    WATTS_PER_CORE (an estimate)."""

    def __init__(self):
        self.files = [p / "energy_uj" for p in Path("/sys/class/powercap").glob("intel-rapl:*")
                      if p.name.count(":") == 1 and os.access(p / "energy_uj", os.R_OK)]
        self.estimated = not self.files

    def _read(self) -> float:
        if self.files:
            return sum(int(f.read_text()) for f in self.files) / 1e6
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return (ru.ru_utime + ru.ru_stime) * WATTS_PER_CORE

    def start(self):
        self.t0 = self._read()

    def stop(self) -> float:
        return max(self._read() - self.t0, 0.0)  # RAPL counters wrap; a negative is a wrap


def _measure_torch(folder: Path, device: str, prompt_tokens: int, new_tokens: int, requests: int,
                   batch: int) -> dict:
    import torch

    from slmkit import models as M

    t0 = time.perf_counter()
    model, tok = M.load_folder(folder, device=M.pick_device(device))
    load_s = time.perf_counter() - t0
    dev = next(model.parameters()).device
    ids = _prompt_ids(tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"], prompt_tokens)
    one = torch.tensor([ids], device=dev)
    bar = _Bar(requests + 2)
    _greedy(model, one, 2)  # warm-up: first-call allocations and kernel selection
    bar.update()
    meter = EnergyMeter()
    meter.start()
    runs = [_greedy(model, one, new_tokens) for _ in bar.counting(range(requests))]
    joules = meter.stop()
    out = summarize([r[0] for r in runs], [r[1] for r in runs], len(ids))
    b_first, b_steps = _greedy(model, one.repeat(batch, 1), new_tokens)
    bar.update()
    bar.close()
    out |= {
        "batch": batch,
        "batched_prefill_tokens_per_s": batch * len(ids) / b_first,
        "batched_decode_tokens_per_s": batch * len(b_steps) / sum(b_steps),
        "energy_j_per_token": joules / (requests * new_tokens),
        "energy_estimated": meter.estimated,
        "watts_per_core_assumed": WATTS_PER_CORE if meter.estimated else None,
        "load_s": load_s,
        "parameters": M.count_parameters(model),
        "bytes_on_disk": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        "device": str(dev),
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


class _Bar:
    """A tqdm bar over the timed runs (stderr), updated between runs, never inside one."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, desc="speed", unit="run", file=sys.stderr, leave=False)

    def update(self):
        self.tqdm.update()

    def counting(self, items):
        for item in items:
            yield item
            self.tqdm.update()

    def close(self):
        self.tqdm.close()


def _prompt_ids(ids: list[int], n: int) -> list[int]:
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _greedy(model, ids, new_tokens: int) -> tuple[float, list[float]]:
    """Greedy decoding with the KV cache. ids: (B, T). Returns (seconds to the first new token,
    seconds of each following step)."""
    import torch

    from slmkit.precision import autocast

    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.no_grad(), autocast(ids.device):
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        sync()
        first = time.perf_counter() - t
        steps = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            steps.append(time.perf_counter() - t)
    return first, steps


def _measure_llamacpp(path: Path, prompt_tokens: int, new_tokens: int, requests: int) -> dict:
    """llama.cpp through llama-cpp-python: one stream (its high-level API has no batching)."""
    import numpy as np

    llama_cpp = require_llamacpp()
    if path.suffix != ".gguf" or not path.is_file():
        raise UsageError(f"--engine llamacpp needs a .gguf file, got `{path}`")
    t0 = time.perf_counter()
    # one thread per usable CPU for prompt and decode alike: llama-cpp-python's own default
    # decodes on half of them (assuming two hyperthreads a core), which on a 2-vCPU machine is one
    # thread; on a hyperthreaded laptop this may be a little slower than physical cores would be
    cores = usable_cores()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens + 16, n_threads=cores,
                          n_threads_batch=cores, verbose=False)
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(llm.tokenize(PROMPT_TEXT.encode(), add_bos=False), prompt_tokens)

    def run(n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first, steps = time.perf_counter() - t, []
        for _ in range(n - 1):
            t = time.perf_counter()
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t)
        return first, steps

    bar = _Bar(requests + 1)
    run(2)
    bar.update()
    meter = EnergyMeter()
    meter.start()
    runs = [run(new_tokens) for _ in bar.counting(range(requests))]
    joules = meter.stop()
    bar.close()
    from slmkit.models import describe_gguf

    params = describe_gguf(Path(path))["parameters"]
    return summarize([r[0] for r in runs], [r[1] for r in runs], len(ids)) | {
        "batch": None, "batched_prefill_tokens_per_s": None, "batched_decode_tokens_per_s": None,
        "energy_j_per_token": joules / (requests * new_tokens), "energy_estimated": meter.estimated,
        "watts_per_core_assumed": WATTS_PER_CORE if meter.estimated else None,
        "load_s": load_s, "parameters": params, "bytes_on_disk": path.stat().st_size, "device": "cpu",
        "threads": min(llm.n_threads, llm.n_threads_batch),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slmkit.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a Hugging Face model folder (torch) or a .gguf file (llamacpp)")
    p.add_argument("--engine", choices=("torch", "llamacpp"), default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    try:
        out = measure(a.path, a.engine, a.device, a.prompt_tokens, a.new_tokens, a.requests, a.batch)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return UsageError.exit_code
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
