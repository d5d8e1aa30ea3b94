"""llama.cpp backend (llama-cpp-python) for `.gguf` files: the fast CPU engine.

Requests are decoded one after the other (llama-cpp-python's `Llama` holds one sequence);
`Llama.generate` reuses the KV cache of a shared prompt prefix, which makes multi-turn chat cheap.
Chat messages are rendered with the GGUF's own `tokenizer.chat_template` in a sandboxed Jinja
environment, as transformers does.
"""

from __future__ import annotations

import random
import threading

from slmkit.backends import (Backend, Completion, Request, TextTracker, TokenLogprobs, now,
                             stop_reason)
from slmkit.errors import UsageError


class LlamaCppBackend(Backend):
    def __init__(self, path: str, name: str, n_threads: int | None = None, n_ctx: int = 0):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UsageError(f"serving `{path}` needs llama-cpp-python: `pip install -e .[llamacpp]` "
                             "(builds from source in ~5 min), or serve the Hugging Face folder "
                             "instead") from None
        try:
            from slmkit.models import usable_cores

            # n_ctx=0: the context length the model was trained with; callers that know their
            # longest prompt ask for less (a 32k context costs GBs of KV cache)
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or usable_cores(),
                             verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"llama.cpp cannot load `{path}` ({e}); check the file with "
                             "`slm info` or export it again") from None
        self.name = name
        self.context_length = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        self.lock = threading.Lock()

    def _special(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", "replace")

    def render(self, messages: list[dict]) -> str:
        if not self.template:
            raise ValueError(f"model `{self.name}` has no chat template; send a plain prompt "
                             "to /v1/completions instead")
        return render_chat(self.template, messages, bos=self._special(self.llm.token_bos()),
                           eos=self._special(self.llm.token_eos()))

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            # add_bos=True adds BOS only where the model's metadata asks for it; special tokens
            # written in the text are parsed, as transformers and llama-cpp-python do
            ids = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        else:  # the template wrote the special tokens itself
            ids = self.llm.tokenize(self.render(prompt).encode("utf-8"), add_bos=False, special=True)
        if not ids:
            ids = [self.llm.token_bos()]
        return ids

    def run(self, requests: list[Request]) -> list[Completion]:
        with self.lock:
            return [self._one(r) for r in requests]

    def _one(self, r: Request) -> Completion:
        import llama_cpp

        prompt = self.prompt_ids(r.prompt)
        if len(prompt) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens; model `{self.name}` reads at "
                             f"most {self.context_length - 1}")
        self.llm.set_seed(r.seed if r.seed is not None else random.getrandbits(31))
        tracker, out, raw = TextTracker(r.stop), [], b""
        lps = [] if r.logprobs else None
        vocab = self.llm._model.vocab  # the end-of-generation test needs the vocab handle
        start, reason = now(), None
        # top_k=0 and min_p=0 switch those samplers off, so only temperature and top_p act,
        # as in the HF backend; temperature 0 is greedy
        for t in self.llm.generate(prompt, top_k=0, top_p=r.top_p, min_p=0.0, temp=r.temperature,
                                   repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, t):
                reason, piece = "stop", tracker.finish()
            else:
                out.append(t)
                if lps is not None:
                    lps.append(self._logprobs(t, r.logprobs))
                raw += self.llm.detokenize([t])
                piece, hit = tracker.update(raw.decode("utf-8", "replace"))
                reason = stop_reason(hit, r, len(prompt), len(out), self.context_length)
                if reason and reason != "stop":
                    piece += tracker.finish()
            if piece and r.on_text:
                r.on_text(piece)
            if reason:
                break
        return Completion(tracker.text, reason or "length", len(prompt), len(out), out, lps,
                          now() - start)

    def _logprobs(self, token: int, k: int) -> TokenLogprobs:
        """Top-k log-probs of the distribution `token` was drawn from: llama.cpp keeps the
        logits of the last decoded position until the next decode."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                       shape=(self.n_vocab,)).astype(np.float64)
        lp = logits - logits.max()
        lp -= np.log(np.exp(lp).sum())
        top = np.argsort(-lp)[:k]
        dec = lambda i: self.llm.detokenize([int(i)]).decode("utf-8", "replace")  # noqa: E731
        return TokenLogprobs(token, dec(token), float(lp[token]),
                             [(int(i), dec(i), float(lp[i])) for i in top])


class GGUFTemplate:
    """What prompt rendering reads from a tokenizer (`chat_template`, `apply_chat_template`),
    served by a llama.cpp backend: a GGUF is then evaluated without loading it in torch."""

    def __init__(self, backend: LlamaCppBackend):
        self.backend = backend
        self.chat_template = backend.template

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        assert not tokenize and add_generation_prompt, "only prompts are rendered here"
        return self.backend.render(messages)


def fit_context(path: str, texts: list[str], max_new_tokens: int) -> int:
    """A context just large enough for the longest of `texts` plus `max_new_tokens` (rounded up
    to 256 tokens, at most the model's own), counted with the GGUF's tokenizer alone."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    longest = max((len(vocab.tokenize(t.encode("utf-8"), add_bos=True, special=True)) for t in texts),
                  default=0)
    trained = int(vocab.metadata.get(f"{vocab.metadata.get('general.architecture')}.context_length", 0)
                  or 0)
    want = -(-(longest + max_new_tokens + 16) // 256) * 256
    return min(want, trained) if trained else want


def render_chat(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """A Hugging Face chat template rendered the way transformers renders it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=True)
