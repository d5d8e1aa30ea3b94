"""Training examples as `slm distill` batches them: encoded (token ids and the loss mask, with
per-token weights for --edit-weight), held out, bucketed by length, packed (--pack) and collated
into left-padded tensors. Beside slmkit.data, which reads and formats the examples."""

from __future__ import annotations

import random
from dataclasses import dataclass

from slmkit.errors import UsageError


@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]
    """1 on tokens that count (answer tokens; all tokens of plain text)."""
    key: str
    """`L{line}`: the example's key in a teacher cache."""
    where: str
    parts: list[Encoded] | None = None
    """A packed row (--pack): the examples it holds, in order; None for a single example."""
    weights: list[float] | None = None
    """Per-token loss weights (--edit-weight, see edit_weights()); None: every counted token 1."""
    spans: list | None = None
    """Cross-tokenizer: each position's byte range of the aligned text (align.position_spans)."""
    teacher: Encoded | None = None
    """Cross-tokenizer, local teacher: the teacher's own encoding of the same example."""
    align: list[int] | None = None
    """Cross-tokenizer, local teacher: per counted prediction, the teacher's (align.prediction_pairs)."""

    @property
    def segments(self) -> list[Encoded]:
        return self.parts or [self]

    @property
    def targets(self) -> int:
        """Positions that count: predictions of counted tokens. The first token has no
        prediction, so it never counts (`predicted` is the same rule on a padded batch)."""
        return sum(self.mask[1:])


def split_rows(path, task, eval_fraction: float, eval_max: int):
    """(train examples, eval examples), held out by data.held_out's rule."""
    from slmkit.data import held_out, read_jsonl, to_example

    rows = read_jsonl(path)
    examples = [(n, to_example(row, f"{path}:{n}", task, need_answer=True)) for n, row in rows]
    held_mask = held_out([row for _, row in rows], eval_fraction, eval_max)
    train = [e for e, h in zip(examples, held_mask) if not h]
    held = [e for e, h in zip(examples, held_mask) if h]
    if not train:
        raise UsageError(f"`{path}` has no training examples (every line is \"split\": \"eval\")")
    return train, held[:eval_max]


def edit_weights(ids: list[int], mask: list[int], weight: float) -> list[float]:
    """Per-token loss weights for --edit-weight, aligned with `ids`: prompt tokens (mask 0) 0; an
    answer token 1 where it copies the prompt and `weight` where it does not, then all scaled so
    the counted answer tokens (every one but an example's first token) average 1, so the loss
    scale and the learning rate mean what they did without. Copied tokens are those in difflib's
    matching blocks between the prompt's and the answer's token ids (in order, no junk
    heuristic). A grammar correction copies most of its input; its few edited tokens are where
    a student goes wrong, and a plain mean lets the copied ones drown them."""
    from difflib import SequenceMatcher

    prompt = [t for t, m in zip(ids, mask) if not m]
    where = [i for i, m in enumerate(mask) if m]
    copied = [False] * len(where)
    matcher = SequenceMatcher(None, prompt, [ids[i] for i in where], autojunk=False)
    for block in matcher.get_matching_blocks():
        copied[block.b:block.b + block.size] = [True] * block.size
    out = [0.0] * len(ids)
    for i, c in zip(where, copied):
        out[i] = 1.0 if c else weight
    counted = [out[i] for i in where if i > 0]
    scale = len(counted) / sum(counted) if counted and sum(counted) > 0 else 1.0
    return [w * scale for w in out]


def encode_all(examples, tokenizer, max_length: int, edit_weight: float = 1.0) -> list[Encoded]:
    from slmkit.data import encode

    out = []
    for line, ex in examples:
        ids, mask = encode(ex, tokenizer, max_length=max_length)
        weights = edit_weights(ids, mask, edit_weight) if edit_weight != 1 else None
        out.append(Encoded(ids, mask, f"L{line}", ex.where, weights=weights))
        if out[-1].targets == 0:
            raise UsageError(f"{ex.where}: no answer tokens left after masking (empty answer, or "
                             f"the example is cut to --max-length {max_length}); fix or remove the line")
    return out


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Length bucketing: shuffle, sort windows of 16 global batches by length, cut into global
    batches, shuffle those. Deterministic in (seed, epoch), so the data position is one number."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = global_batch * 16
    batches = []
    for w in range(0, len(order), window):
        part = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [part[i:i + global_batch] for i in range(0, len(part) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Sequence packing (--pack): examples placed first-fit, longest first, into rows of at most
    `max_length` tokens. Within a row each example keeps its own positions (0, 1, ...) and sees
    only itself, and its first token does not count: it has no prediction of its own."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.ids)):
        i = next((i for i, r in enumerate(room) if r >= len(e.ids)), None)
        if i is None:
            rows.append([e])
            room.append(max_length - len(e.ids))
        else:
            rows[i].append(e)
            room[i] -= len(e.ids)
    weighted = any(e.weights for e in examples)
    return [Encoded([t for e in parts for t in e.ids],
                    [m if j else 0 for e in parts for j, m in enumerate(e.mask)],
                    parts[0].key, parts[0].where, parts=parts,
                    weights=[w for e in parts for w in (e.weights or e.mask)] if weighted else None)
            for parts in rows]


def left_pad(rows: list[list], fill=0, dtype=None):
    """(B, W) tensor of `rows`, each right-aligned (left-padded with `fill`), W the longest."""
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype or torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = torch.tensor(r, dtype=out.dtype)
    return out


def collate_weights(items: list[Encoded]):
    """The per-token weights of a batch, (B, W) float aligned with collate()'s ids; None when no
    item has weights (an item without: its mask)."""
    import torch

    if not any(e.weights for e in items):
        return None
    return left_pad([e.weights or e.mask for e in items], dtype=torch.float)


def collate(items: list[Encoded], pad_id: int):
    """Left-padded batch: (ids, attention, mask, positions), each (B, W) long. Left padding puts
    every answer at the right edge, so the logits of the last K columns cover all of them.
    Positions count from 0 in each example; with packed rows in the batch they also count from 0
    over the padding, which makes it a segment of its own (see `logits_window`)."""
    import torch

    ids = left_pad([e.ids for e in items], pad_id)
    att = left_pad([[1] * len(e.ids) for e in items])
    mask = left_pad([e.mask for e in items])
    pos = left_pad([[j for part in e.segments for j in range(len(part.ids))] for e in items])
    if any(e.parts for e in items):
        for i, e in enumerate(items):
            pad = ids.shape[1] - len(e.ids)
            pos[i, :pad] = torch.arange(pad)
    return ids, att, mask, pos


def predicted(mask, att):
    """The positions that count in a left-padded batch: (B, W) mask and attention -> (B, W - 1)
    bool, True where column c's logits predict a counted token c + 1 *and* column c is a real
    token. Without the second condition the pad column left of a row whose first token counts
    (plain text, an answer that fills --max-length) would be trained to predict that token."""
    return mask[:, 1:].bool() & att[:, :-1].bool()
