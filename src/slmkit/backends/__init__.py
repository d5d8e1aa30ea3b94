"""Text generation behind one small interface, shared by `slm serve`, `slm chat` and `slm generate`.

    from slmkit.backends import load_backend
    backend = load_backend("default")              # HF folder or `default` -> PyTorch, .gguf -> llama.cpp
    [c] = backend.generate(["Say hi."], max_tokens=16)           # greedy (temperature 0)
    c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens
    for piece in backend.stream([{"role": "user", "content": "Hi"}], max_tokens=16):
        print(piece, end="")

A prompt is either a plain string (sent as is, the tokenizer's BOS added) or a list of chat
messages `[{"role", "content"}]` rendered through the model's chat template.

Backend (hf.HFBackend, llamacpp.LlamaCppBackend):
    name: str                  model name (file or folder stem)
    context_length: int        prompt tokens + generated tokens must fit in it
    batched: bool              whether `run` decodes several requests together (HF) or in turn
    generate(prompts, *, max_tokens=256, temperature=0.0, top_p=1.0, stop=None, seed=None,
             n=1, logprobs=0) -> list[Completion]
        One Completion per prompt and sample, grouped by prompt: len == len(prompts) * n, sample j
        of prompt i at i * n + j; sample j uses seed + j. temperature 0 is greedy. Generation
        ends at the model's end-of-sequence token, a stop string (not included in the text) or
        max_tokens. logprobs=k > 0 fills Completion.logprobs with the top-k log-probabilities
        (log-softmax of the raw logits, temperature 1) of every generated token.
    stream(prompt, **same keywords but n) -> iterator of text pieces; joined they equal the
        Completion's text. Text that may start a stop string is held back until it is decided.
    run(requests: list[Request]) -> list[Completion]
        The primitive under both: each Request carries its own parameters, an `on_text` callback
        for streaming, a deadline and a cancel flag. The HF backend decodes the requests as one
        left-padded batch; llama.cpp decodes them one after the other.
    prompt_ids(prompt) -> list[int]   the token ids the model will see (for length checks)

Both backends hold a lock inside `run`, so several threads may share one backend.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from slmkit.errors import UsageError


@dataclass
class TokenLogprobs:
    """One generated token: its id, text and log-probability, and the top-k alternatives."""

    id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]
    """(id, text, logprob) of the k most likely tokens, most likely first."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    """`stop` (EOS or a stop string), `length` (max_tokens or context), `timeout`, `cancelled`."""
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    seconds: float = 0.0
    """Wall time from the start of decoding this request to its end."""


MAX_SEED = 2**63 - 1


# top-k log-probs a position: the most OpenAI-compatible servers return (vLLM's default
# max_logprobs, OpenAI's top_logprobs); slm serve answers up to this, a served teacher is asked for it
MAX_LOGPROBS = 20


def check_sampling(max_tokens: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, logprobs: int = 0) -> None:
    """The one range check of sampling parameters (every backend, `slm serve`, `slm chat`):
    a ValueError whose message starts with the parameter's name, for the caller to name its
    JSON key or flag."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("max_tokens must be an integer >= 1")
    if not 0.0 <= temperature <= 2.0:
        raise ValueError("temperature must be in [0, 2] (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
    # PyTorch's generators take 64-bit seeds; a larger one would fail the request's batch
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (2**63 - 1)")


@dataclass
class Request:
    prompt: str | list[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int = 0
    on_text: Callable[[str], None] | None = None
    """Called from the decoding thread with each new piece of text (never with held-back text)."""
    deadline: float | None = None
    """time.monotonic() after which decoding stops with finish_reason `timeout`."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set it (e.g. when a streaming client hangs up) to stop decoding this request."""

    def __post_init__(self):
        check_sampling(self.max_tokens, self.temperature, self.top_p, self.seed, self.logprobs)


class Backend:
    """Shared conveniences on top of `run`; subclasses define name, context_length, run,
    prompt_ids."""

    name: str
    context_length: int
    batched: bool = False

    def run(self, requests: list[Request]) -> list[Completion]:
        raise NotImplementedError

    def prompt_ids(self, prompt) -> list[int]:
        raise NotImplementedError

    def score_prompt(self, ids: list[int], k: int) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: for each position t of `ids`, the model's top-k next-token
        log-probs after ids[:t] plus ids[t]'s own, as {id: (logprob, rank, text)}; None at t = 0."""
        raise NotImplementedError(f"`{self.name}` cannot score prompts (prompt_logprobs)")

    def generate(self, prompts: list, *, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 n: int = 1, logprobs: int = 0) -> list[Completion]:
        reqs = [Request(p, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        stop=list(stop or []), seed=None if seed is None else seed + j,
                        logprobs=logprobs)
                for p in prompts for j in range(n)]
        return self.run(reqs)

    def stream(self, prompt, **kw) -> Iterator[str]:
        """Yield text pieces as they are decoded (decoding runs in a helper thread)."""
        pieces: queue.Queue = queue.Queue()
        req = Request(prompt, on_text=pieces.put, **kw)
        done = object()

        def work():
            try:
                self.run([req])
            except BaseException as e:  # re-raised in the caller's thread
                pieces.put(e)
            pieces.put(done)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancel.set()  # the consumer stopped early: stop decoding


def model_name(spec: str) -> str:
    """The name a model is served under: `default` or a packaged name as it is, a Hub id's last
    part, else the file or folder stem."""
    from slmkit.models import HUB_ID, is_name

    if is_name(spec):
        return str(spec)
    if HUB_ID.match(str(spec)) and not Path(str(spec)).exists():
        return str(spec).split("@")[0].split("/")[-1]
    return Path(str(spec).rstrip("/")).name.removesuffix(".gguf")


def load_backend(spec: str, name: str | None = None, device: str | None = None,
                 dtype: str = "float32", n_threads: int | None = None,
                 trust_remote_code: bool = False) -> Backend:
    """A `.gguf` file -> llama.cpp (CPU); a Hugging Face folder or `default` -> PyTorch.
    n_threads: CPU threads of llama.cpp, or of PyTorch (process-wide) for the PyTorch backend.
    trust_remote_code: let a Hugging Face folder run its own code (never by default)."""
    from slmkit.models import DEFAULT, gguf_path

    name = name or model_name(spec)
    # a .gguf file or a packaged name runs in llama.cpp; `default` stays in PyTorch, where its
    # tokens and log-probs match the students it teaches bit for bit
    gguf = gguf_path(spec) if str(spec) != DEFAULT else None
    if gguf is not None:
        if not gguf.is_file():
            raise UsageError(f"model path `{spec}` does not exist; give a .gguf file, "
                             "a Hugging Face folder, a Hub id or a name (`slm models`)")
        from slmkit.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(str(gguf), name=name, n_threads=n_threads)
    from slmkit.backends.hf import HFBackend

    if n_threads:
        import torch

        # process-wide; fewer threads than cores is faster on a CPU shared with other work
        torch.set_num_threads(n_threads)
    return HFBackend(spec, name=name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- shared decoding helpers

class TextTracker:
    """Turns the growing decoded text of one request into safe-to-emit pieces and finds stop
    strings. Text that could be the start of a stop string, or an unfinished UTF-8 character
    (decoded as U+FFFD), is held back until the next token decides it."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.emitted = 0  # characters already handed out
        self.text = ""

    def update(self, text: str) -> tuple[str, bool]:
        """Feed the full decoded text so far; returns (new piece, hit a stop string)."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._take(len(self.text)), True
        self.text = text
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:  # the longest suffix of text that is a prefix of s
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._take(safe), False

    def finish(self) -> str:
        """The held-back rest, at the end of decoding (EOS or max_tokens)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


def stop_reason(hit: bool, request: "Request", n_prompt: int, n_out: int,
                context_length: int) -> str | None:
    """Why decoding of `request` ends after this token, or None to go on (same rule for every
    backend): a stop string, the token or context limit, a cancel, or the deadline."""
    if hit:
        return "stop"
    if n_out >= request.max_tokens or n_prompt + n_out >= context_length:
        return "length"
    if request.cancel.is_set():
        return "cancelled"
    if request.deadline is not None and now() > request.deadline:
        return "timeout"
    return None


def now() -> float:
    return time.monotonic()
