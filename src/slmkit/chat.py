"""Chat with a model in the terminal; answers are printed as they are written.

    slm chat default
    slm chat runs/demo/student --system "Answer in one sentence." --temperature 0.7
    slm chat runs/demo/export/student.q8_0.gguf

Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits. Ctrl-C stops the answer
being written and keeps what was written. When the conversation outgrows the model's context,
the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from slmkit.backends import Backend, check_sampling, load_backend
from slmkit.cli import add_config_arguments, config_from_args, flag_error, option
from slmkit.errors import chat_template_error
from slmkit.models import DTYPES


@dataclass
class ChatConfig:
    """One `slm chat` session; CLI flags are these names with dashes."""

    model: str = option(help="Hugging Face folder, .gguf file or `default`", flags=("model",),
                        metavar="MODEL")
    system: str | None = option(None, "system prompt")
    max_tokens: int = option(512, "longest answer, in tokens")
    temperature: float = option(0.7, "0 is greedy")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens with this much probability")
    seed: int | None = option(None, "random seed of the sampling")
    device: str | None = option(None, "PyTorch device (default: cuda when present)")
    dtype: str = option("float32", "PyTorch dtype", choices=DTYPES)
    threads: int | None = option(None, "CPU threads for llama.cpp or PyTorch (default: theirs)")

    def __post_init__(self):
        try:
            check_sampling(self.max_tokens, self.temperature, self.top_p, self.seed)
        except ValueError as e:
            raise flag_error(e, self) from None


def add_arguments(p) -> None:
    add_config_arguments(p, ChatConfig)


def run(args) -> int:
    cfg = config_from_args(ChatConfig, args)
    backend = load_backend(cfg.model, device=cfg.device, dtype=cfg.dtype, n_threads=cfg.threads)
    print(f"slm chat: {backend.name} ({backend.context_length} tokens of context); "
          "/reset forgets, /exit quits", file=sys.stderr)
    from jinja2.exceptions import TemplateError

    try:
        return chat_loop(backend, system=cfg.system, max_tokens=cfg.max_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    except TemplateError as e:
        raise chat_template_error(cfg.model, e) from None


def chat_loop(backend: Backend, read: Callable[[str], str] = input, out: TextIO | None = None,
              system: str | None = None, max_tokens: int = 512, **sampling) -> int:
    """Read a line, stream the answer, keep the history; `read` raises EOFError at the end.
    out: where the answers go (default: sys.stdout as it is at the call, not at import)."""
    out = out or sys.stdout
    history: list[dict] = []
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            out.write("(conversation forgotten)\n")
            continue
        if line.startswith("/"):
            out.write("commands: /reset forgets the conversation, /exit quits\n")
            continue
        history.append({"role": "user", "content": line})
        msgs, room = fit(backend, system, history, max_tokens)
        if room < 1:
            history.pop()
            out.write("(that message alone is longer than the model's context; say less)\n")
            continue
        out.write("model> ")
        answer = []
        try:
            for piece in backend.stream(msgs, max_tokens=room, **sampling):
                answer.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            out.write(" [stopped]")
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def fit(backend: Backend, system: str | None, history: list[dict], max_tokens: int):
    """Drop the oldest turns until the prompt leaves room to answer; returns (messages, room).
    `history` is trimmed in place so later turns do not pay for it again."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        msgs = head + history
        room = backend.context_length - len(backend.prompt_ids(msgs))
        if room >= min(max_tokens, 64) or len(history) <= 1:
            return msgs, min(max_tokens, room)
        del history[:2]  # one user turn and its answer
