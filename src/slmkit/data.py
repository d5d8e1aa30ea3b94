"""JSONL examples: reading with file:line errors, chat formatting, loss masks, batching.

Accepted lines (one JSON object each):
  {"input": ..., "output": ...}                    prompt/answer pair
  {"messages": [{"role": ..., "content": ...}]}    chat; assistant turns are the answer
  {"text": ...}                                    plain text; every token counts
  task fields, e.g. {"dialogue": ..., "summary": ...} with a task (see tasks.py)
A line may carry "split": "train"|"eval" and "id".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import UsageError, read_text
from slmkit.tasks import Task


@dataclass
class Example:
    prompt: str | None = None
    """The user message (already rendered through the task template)."""
    answer: str | None = None
    messages: list[dict] | None = None
    text: str | None = None
    references: list[str] = field(default_factory=list)
    row: dict = field(default_factory=dict)
    where: str = ""
    """file:line, for error messages."""


def read_jsonl(path: str | Path, what: str = "data file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises naming file:line.
    what: how errors name the file (e.g. "--ppl")."""
    path = Path(path)
    rows = []
    # split on "\n" only: str.splitlines() would also cut at U+2028 inside a JSON string
    for n, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise UsageError(f"{what} `{path}` is empty; it needs at least one JSON line")
    return rows


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_example(row: dict, where: str, task: Task | None = None, need_answer: bool = False) -> Example:
    if task is not None:
        task.check(row, where, need_target=need_answer)
        refs = task.references(row)
        return Example(prompt=task.prompt(row), answer=refs[0] if refs else None,
                       references=refs, row=row, where=where)
    if "messages" in row:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)):
            raise UsageError(f"{where}: `messages` must be a non-empty list of "
                             "{\"role\", \"content\"} objects")
        answer = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), None)
        if need_answer and answer is None:
            raise UsageError(f"{where}: `messages` has no assistant turn to learn from")
        return Example(messages=msgs, answer=answer, references=[answer] if answer else [],
                       row=row, where=where)
    if isinstance(row.get("input"), str):
        out = row.get("output")
        if need_answer and not isinstance(out, str):
            raise UsageError(f"{where}: key `output` missing or not text")
        return Example(prompt=row["input"], answer=out if isinstance(out, str) else None,
                       references=[out] if isinstance(out, str) else [], row=row, where=where)
    if isinstance(row.get("text"), str):
        return Example(text=row["text"], row=row, where=where)
    raise UsageError(f"{where}: no `input`/`output`, `messages` or `text` key; "
                     "see the data format in the README (or pass --task for task fields)")


def load_examples(path, task: Task | None = None, split: str | None = None,
                  need_answer: bool = False, limit: int | None = None) -> list[Example]:
    """Examples from a JSONL file, optionally only one split (lines without `split` always count)."""
    examples = []
    for n, row in read_jsonl(path):
        if split is not None and row.get("split", split) != split:
            continue
        examples.append(to_example(row, f"{path}:{n}", task, need_answer=need_answer))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise UsageError(f"`{path}` has no examples" + (f" in split `{split}`" if split else ""))
    return examples


EVAL_FRACTION, EVAL_MAX = 0.1, 100  # the held-out part of data whose lines name no eval split


def held_out(rows: list[dict], fraction: float = EVAL_FRACTION, most: int = EVAL_MAX) -> list[bool]:
    """Which rows are held out for evaluation (the one rule of `slm distill` and `slm build`):
    those marked "split": "eval" when any row is; else round(fraction x rows), at least 1 of two
    or more and at most `most`, picked by a shuffle with a fixed seed, so a file always splits
    the same way whatever the run's seed."""
    import random

    if any(row.get("split") == "eval" for row in rows):
        return [row.get("split") == "eval" for row in rows]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    chosen = set(order[:min(most, max(1, round(fraction * len(rows))))] if len(rows) > 1 else [])
    return [i in chosen for i in range(len(rows))]


# A dev set's parts (`eval_part:` of a recipe): a quarter to score (test), a quarter to choose
# settings on (validation), the rest free for training. Whole quarters keep each part near the
# 200 lines a paired difference of a few points needs.
DEV_PARTS = {"test": 0.25, "validation": 0.25}


def dev_part(prompt: str) -> str:
    """`test`, `validation` or `train`: the part of a dev set a line belongs to, from a hash of
    its task prompt (the input alone, never the reference). The same line lands in the same part
    on every machine, whatever the file's order or other lines, so a part chosen on never leaks
    into the part reported, and data the teacher writes can be kept out of both by its text."""
    import hashlib

    u = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64
    for part, share in DEV_PARTS.items():
        if u < share:
            return part
        u -= share
    return "train"


# --------------------------------------------------------------------------- tokenisation

def apply_chat_template(tokenizer, messages: list[dict], **kw) -> str:
    """tokenizer.apply_chat_template as text; a template that fails (or breaks out of the
    Jinja sandbox) is a UsageError naming the model."""
    from jinja2.exceptions import TemplateError

    from slmkit.errors import chat_template_error

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except TemplateError as e:
        raise chat_template_error(getattr(tokenizer, "name_or_path", None), e) from None


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        return apply_chat_template(tokenizer, msgs, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + user + "\n\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(example: Example, tokenizer, max_length: int = 1024) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): mask is 1 on answer tokens (all tokens for plain text).
    Prompts are cut from the left when too long so the answer always fits."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.text is not None:
        ids = _ids(tokenizer, example.text)[:max_length]
        return ids, [1] * len(ids)
    if example.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{example.where}: chat messages need a tokenizer with a chat template")
        ids, mask = [], []
        for i, m in enumerate(example.messages):
            if m["role"] != "assistant":
                continue
            # chat templates only append, so each rendering extends the previous one
            prefix = _ids(tokenizer, apply_chat_template(tokenizer, example.messages[:i],
                                                         add_generation_prompt=True))
            full = _ids(tokenizer, apply_chat_template(tokenizer, example.messages[: i + 1]))
            new_prompt, ans = prefix[len(ids):], full[len(prefix):]
            ids += new_prompt + ans
            mask += [0] * len(new_prompt) + [1] * len(ans)
        return ids[-max_length:], mask[-max_length:]
    prompt = _ids(tokenizer, chat_prompt(tokenizer, example.prompt))
    answer = _ids(tokenizer, example.answer or "") + eos if example.answer is not None else []
    keep = max(0, max_length - len(answer))
    prompt = prompt[-keep:] if keep else []
    ids = (prompt + answer)[:max_length]
    return ids, ([0] * len(prompt) + [1] * len(answer))[:max_length]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """Pad lists of ids into (ids, attention_mask) LongTensors of shape (batch, max_len)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.tensor(s)
            att[i, width - len(s):] = 1
    return ids, att


def calibration_texts(path: str | Path, limit: int | None = None, what: str = "text file",
                      train_only: bool = False) -> list[str]:
    """Texts for importance estimation or perplexity: a .txt file (blank-line separated
    paragraphs, else lines) or JSONL (the string fields of each line joined, e.g. a dialogue and
    its summary). train_only: leave out lines marked "split": "eval" (pruning calibration: what a
    model is scored on must not shape it). what: how errors name the file (prune: "--calib")."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for n, row in read_jsonl(path, what):
            if train_only and row.get("split") == "eval":
                continue
            parts = [v for k, v in row.items() if isinstance(v, str) and k not in ("id", "split", "fname")]
            if parts:
                texts.append("\n".join(parts))
    else:
        raw = read_text(path, what)
        texts = [t.strip() for t in (raw.split("\n\n") if "\n\n" in raw else raw.splitlines())]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UsageError(f"{what} `{path}` has no text; give a .txt or a JSONL with text fields")
    return texts[:limit] if limit else texts
