"""The teacher's top-k next-token log-probs on disk: one safetensors file, one writer, one reader.

Format `slmkit-topk-v2` is keyed by text, not by a student's tokenization, so one file teaches
students of any tokenizer (slmkit.align maps it onto each). For the example filed under KEY
(align.text_key: its prompt and answer text):

    KEY.tokens    int32 (n,)     the teacher's tokens of the aligned text (vocabulary indices)
    KEY.spans     int32 (n, 2)   each token's byte range [start, end) of the UTF-8 text; the
                                 end-of-sequence token after an answer covers (L, L + 1)
    KEY.ids       int32 (n, k)   the teacher's top-k next tokens where it predicts token j
    KEY.logprobs  float16 (n, k) their log-probs at temperature 1; -inf: no prediction (a plain
                                 text's first token) or fewer than k alternatives given
    vocab.bytes   uint8          the teacher's vocabulary, every entry's bytes concatenated;
    vocab.offsets int64 (V + 1)  entry i is bytes[offsets[i]:offsets[i + 1]] (-1, -1: no text)

Metadata: format, k, teacher, stops (JSON list of the vocabulary indices that end an answer),
source (who wrote it: `distill` or `generate`), autocast. A teacher known only by token text (an
HTTP API) gets a vocabulary of the texts it returned, in the order first seen.

The older `slmkit-topk-v1` (rows by student token id, keyed by data line) is still read by the
same-tokenizer path of slmkit.distill; `open_v2` refuses it with the command that rewrites it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slmkit.errors import UsageError

FORMAT = "slmkit-topk-v2"
FORMAT_V1 = "slmkit-topk-v1"


def format_of(path) -> str | None:
    """The file's `format` metadata; a missing or unreadable file is a UsageError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--teacher-cache `{path}` does not exist; make it with "
                         "`slm distill --teacher MODEL --data ... --cache-teacher FILE`")
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise UsageError(f"--teacher-cache `{path}` is not a readable safetensors file ({e})") from None


class Writer:
    """Collects examples' rows in memory (top-k rows are small: n x k x 6 bytes) and writes the
    file once, atomically (temp + rename), so a crash leaves no half file."""

    def __init__(self, k: int, teacher: str, source: str, vocab: list[bytes | None] | None = None,
                 stops=(), **meta):
        self.k, self.tensors = k, {}
        self.vocab: list[bytes | None] = list(vocab) if vocab is not None else []
        self.index = {b: i for i, b in enumerate(self.vocab) if b is not None}
        self.stops = sorted({int(s) for s in stops if s is not None})
        self.meta = {"format": FORMAT, "k": str(k), "teacher": str(teacher), "source": source,
                     **{key: str(v) for key, v in meta.items()}}

    def intern(self, piece: bytes) -> int:
        """The vocabulary index of a token known by its text (HTTP teachers), added if new."""
        got = self.index.get(piece)
        if got is None:
            got = self.index[piece] = len(self.vocab)
            self.vocab.append(piece)
        return got

    def add(self, key: str, tokens, spans, ids, logprobs) -> None:
        """tokens (n,), spans (n, 2), ids (n, k) and logprobs (n, k) of one example; rows with
        fewer than k alternatives are padded with -inf."""
        import torch

        if not len(tokens):  # nothing of the text is the teacher's (generate: see its docstring)
            ids, logprobs = torch.zeros(0, self.k), torch.zeros(0, self.k)
        ids = torch.as_tensor(ids, dtype=torch.int32).reshape(len(tokens), -1 if len(tokens) else self.k)
        lp = torch.as_tensor(logprobs, dtype=torch.float32).reshape(len(tokens), -1 if len(tokens) else self.k)
        if ids.shape[1] < self.k:
            pad = self.k - ids.shape[1]
            ids = torch.cat([ids, ids.new_zeros(len(tokens), pad)], 1)
            lp = torch.cat([lp, lp.new_full((len(tokens), pad), float("-inf"))], 1)
        self.tensors[f"{key}.tokens"] = torch.as_tensor(tokens, dtype=torch.int32).contiguous()
        self.tensors[f"{key}.spans"] = torch.as_tensor(spans, dtype=torch.int32).reshape(-1, 2).contiguous()
        self.tensors[f"{key}.ids"] = ids[:, :self.k].contiguous()
        self.tensors[f"{key}.logprobs"] = lp[:, :self.k].half().contiguous()

    def __len__(self) -> int:
        return sum(k.endswith(".tokens") for k in self.tensors)

    def save(self, dest) -> Path:
        import torch
        from safetensors.torch import save_file

        dest = Path(dest)
        blob, offsets = bytearray(), [0]
        for b in self.vocab:
            blob += b or b""
            offsets.append(len(blob) if b is not None else -1)
        # a missing entry: -1 as its end; the next one starts at the last real end
        tensors = dict(self.tensors)
        tensors["vocab.bytes"] = torch.tensor(list(blob) or [0], dtype=torch.uint8)
        tensors["vocab.offsets"] = torch.tensor(offsets, dtype=torch.int64)
        meta = self.meta | {"stops": json.dumps(self.stops), "vocab_size": str(len(self.vocab))}
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, dest)
        return dest


class Reader:
    """A v2 file, opened lazily (safetensors memory-maps it: rows are read when asked for)."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        fmt = format_of(self.path)
        if fmt == FORMAT_V1:
            raise UsageError(f"--teacher-cache `{path}` is a `{FORMAT_V1}` file (rows by the "
                             "student's token ids), which only a student of the teacher's tokenizer "
                             "reads; rewrite it as text-keyed rows with `slm distill --teacher MODEL "
                             "--data ... --cache-teacher FILE` (or rerun `slm generate "
                             "--topk-logprobs`), or pass --cross-tokenizer off")
        if fmt != FORMAT:
            raise UsageError(f"--teacher-cache `{path}`: not a `{FORMAT}` file")
        self.file = safe_open(str(self.path), framework="pt")
        meta = self.file.metadata()
        self.k, self.teacher = int(meta["k"]), meta.get("teacher")
        self.stops = json.loads(meta.get("stops") or "[]")
        blob = bytes(self.file.get_tensor("vocab.bytes").tolist())
        offsets = self.file.get_tensor("vocab.offsets").tolist()
        self.vocab: list[bytes | None] = []
        start = 0
        for end in offsets[1:]:
            if end < 0:
                self.vocab.append(None)
            else:
                self.vocab.append(blob[start:end])
                start = end

    def get(self, key: str, where: str):
        """(tokens (n,) long, spans list of (start, end), ids (n, k) long, logprobs (n, k) float32)."""
        try:
            tokens = self.file.get_tensor(f"{key}.tokens").long()
            spans = [tuple(s) for s in self.file.get_tensor(f"{key}.spans").tolist()]
            ids = self.file.get_tensor(f"{key}.ids").long()
            lp = self.file.get_tensor(f"{key}.logprobs").float()
        except Exception:  # safetensors raises its own error for a missing key
            raise UsageError(f"{where}: not in the teacher cache `{self.path}` (its prompt or answer "
                             "text differs); remake the cache on this data with --cache-teacher") from None
        return tokens, spans, ids, lp


def merge(paths, dest) -> Path:
    """One file of the examples of several v2 files of the same teacher (the same vocabulary
    and k): the label stage's top-k of the teacher's answers, captured while it wrote them, and
    of the human lines, scored after. A key in two files keeps the first file's rows."""
    from safetensors.torch import save_file

    readers = [Reader(p) for p in paths]
    first = readers[0]
    tensors, meta = {}, first.file.metadata()
    for r in readers:
        if r.vocab != first.vocab or r.k != first.k:
            raise UsageError(f"{r.path} and {first.path}: top-k of different teachers (vocabulary "
                             "or k differ) cannot be merged into one cache")
        for key in r.file.keys():
            tensors.setdefault(key, r.file.get_tensor(key))
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta | {"source": "+".join(
        dict.fromkeys(r.file.metadata().get("source", "?") for r in readers))})
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- v1 (read only)

def open_v1(path, tokenizer_hash: str, data_path, cfg):
    """A `slmkit-topk-v1` file, for a student of the teacher's tokenizer (the direct path of
    slmkit.distill): rows by student token id, keyed `L{line}` of one data file. Its tokenizer,
    data, max_length and task must be this run's."""
    from safetensors import safe_open

    from slmkit.data import file_hash

    fmt = format_of(path)
    if fmt != FORMAT_V1:
        raise UsageError(f"--teacher-cache `{path}`: not a `{FORMAT_V1}` or `{FORMAT}` file")
    f = safe_open(str(path), framework="pt")
    meta = f.metadata() or {}
    for key, want in (("tokenizer", tokenizer_hash), ("data", file_hash(data_path)),
                      ("max_length", str(cfg.max_length)), ("task", str(cfg.task))):
        if meta.get(key) != want:
            raise UsageError(f"--teacher-cache `{path}` was made with another {key} "
                             f"({meta.get(key)} vs {want}); remake it with --cache-teacher")
    return f


def v1_rows(cache, items, device):
    """The v1 rows of `items` (distill.Encoded, keyed `L{line}`), concatenated in batch order:
    ((M, k) float32, (M, k) long). Called outside autocast (slmkit.precision, rule 3): the
    file's float16 would meet bf16."""
    import torch

    lps, idss = [], []
    for e in (part for item in items for part in item.segments):
        try:
            lp, ids = cache.get_tensor(f"{e.key}.logprobs"), cache.get_tensor(f"{e.key}.ids")
        except Exception:  # safetensors raises its own error for a missing key
            raise UsageError(f"{e.where}: not in the teacher cache; remake it with --cache-teacher") from None
        if lp.shape[0] != e.targets:
            raise UsageError(f"{e.where}: the teacher cache has {lp.shape[0]} answer positions, the "
                             f"data {e.targets}; remake it with --cache-teacher")
        lps.append(lp)
        idss.append(ids)
    return torch.cat([lp.float() for lp in lps]).to(device), torch.cat(idss).to(device).long()
