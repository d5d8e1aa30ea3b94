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
from typing import Callable, TextIO

from slmkit.backends import Backend, check_sampling, load_backend
from slmkit.errors import UsageError, chat_template_error


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="Hugging Face folder, .gguf file or `default`")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="PyTorch device (default: cuda when present)")
    p.add_argument("--dtype", default="float32", help="PyTorch dtype: float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for llama.cpp or PyTorch (default: theirs)")


def run(args) -> int:
    try:
        check_sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as e:  # "NAME must be ...": name the flag and its value
        name, why = str(e).split(" ", 1)
        raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: {why}") from None
    backend = load_backend(args.model, device=args.device, dtype=args.dtype, n_threads=args.threads)
    print(f"slm chat: {backend.name} ({backend.context_length} tokens of context); "
          "/reset forgets, /exit quits", file=sys.stderr)
    from jinja2.exceptions import TemplateError

    try:
        return chat_loop(backend, system=args.system, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except TemplateError as e:
        raise chat_template_error(args.model, e) from None


def chat_loop(backend: Backend, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
              system: str | None = None, max_tokens: int = 512, **sampling) -> int:
    """Read a line, stream the answer, keep the history; `read` raises EOFError at the end."""
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
