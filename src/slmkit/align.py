"""Cross-tokenizer alignment: the same text under two tokenizers, and the teacher's next-token
distributions moved onto the student's vocabulary.

Positions. Both models read their own prompt (each in its own chat template) followed by the
same answer text, each tokenized its own way. Every token covers a byte range of that text;
`groups` walks both lists of token end offsets with two pointers and closes a group wherever both
tokenizations end at the same byte (TRL's GOLD, `trl/experimental/gold`, does the same walk). The
first tokens of a group start at a byte where both tokenizations have a boundary, so the student
and the teacher predicting them have read exactly the same text: their next-token distributions
are about the same event and are compared (`pairs`). A student token inside a group (its context
ends where the teacher has no boundary) has no teacher prediction with the same context: it gets
no KD, only CE. This is GOLD's "observed" merge without its scalar factor, which is the same for
every entry of a row and cancels in a normalised comparison. The end of the answer is one more
boundary: each model's end-of-sequence token follows it, and those two predictions pair up too.
For a same-tokenizer pair every token is its own group, so the text path pairs every position
with itself and gives the direct path's KD exactly.

Vocabulary. A teacher token maps to the student token with exactly its bytes (GOLD matches
vocabulary strings, which misses a byte-level `Ġthe` against a SentencePiece `▁the`; bytes do
not); a teacher token the student lacks maps to the student's longest token that is a prefix of
its bytes. That rule is a marginalisation, not a guess: the teacher's mass on `2024` is mass on
"the text goes on with 2024", hence on "it goes on with 2" -- the student's event when it splits
digits. X-Token (arXiv 2605.21699) shows that exact-match-only mapping loses exactly these cases
(numbers split differently: GSM8K 2.56 vs 12.89) and fixes them with a learned sparse projection;
the prefix rule is the projection that needs no training. Several teacher tokens may land on one
student token (their probabilities add). The teacher's end-of-sequence and stop tokens map to the
student's end-of-sequence token; a special token without text maps nowhere.

Loss (slmkit.losses.tail_buckets / mapped_kd): the divergence over the student tokens that carry
teacher mass plus one tail bucket, the teacher's mass that maps nowhere (and, for a top-k teacher,
that lies outside its top-k) against the student's mass on all other tokens. Where ULD (arXiv
2402.12030) compares sorted probability vectors, which ignores which token is which, the bucket
keeps the identity of every mapped token and still pushes the student's mass out of tokens the
teacher does not predict.

Token bytes come from the tokenizer's decoder kind (`DECODERS`, one table): byte-level BPE spells
bytes with GPT-2's printable alphabet, SentencePiece-style vocabularies use `▁` for a space and
`<0xNN>` for byte fallback; anything else decodes the token alone.
"""

from __future__ import annotations

import json
from functools import lru_cache

NONE = -1  # no student token / no teacher prediction


@lru_cache(maxsize=1)
def _gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (character -> byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _byte_level(piece: str) -> bytes | None:
    table = _gpt2_bytes()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:
        return None


def _metaspace(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("▁", " ").encode()


def _decoder_kinds(spec: dict | None) -> set[str]:
    if not spec:
        return set()
    kinds = {spec.get("type")}
    for d in spec.get("decoders") or []:
        kinds |= _decoder_kinds(d)
    if spec.get("type") == "Replace" and (spec.get("pattern") or {}).get("String") == "▁":
        kinds.add("Metaspace")
    return kinds


# decoder kind -> how a vocabulary entry spells its bytes (the first kind present wins)
DECODERS = (("ByteLevel", _byte_level), ("Metaspace", _metaspace), ("ByteFallback", _metaspace))


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for, a list of len(tokenizer); an added token (chat
    markers, EOS) stands for its own text, as it appears in a rendered template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder")) if backend else set()
    spell = next((f for kind, f in DECODERS if kind in kinds), None)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode())
        elif piece is None:
            out.append(None)
        elif spell is not None:
            out.append(spell(piece))
        else:
            out.append(tokenizer.decode([i]).encode())
    return out


def spans(tokenizer, text: str, ids: list[int], vocab: list[bytes | None] | None = None) -> list[tuple[int, int]]:
    """Byte range [start, end) of `text` (UTF-8) that each of `ids` covers, `ids` being
    tokenizer(text, add_special_tokens=False) or a prefix of it. From the tokens' own bytes when
    they spell the text (optionally after a prefix space the tokenizer adds); else from the fast
    tokenizer's character offsets, made monotone (byte-level tokens that split one character both
    report the whole character)."""
    data = text.encode()
    vocab = vocab if vocab is not None else token_bytes(tokenizer)
    pieces = [vocab[i] if 0 <= i < len(vocab) else None for i in ids]
    if all(p is not None for p in pieces):
        joined = b"".join(pieces)
        shift = 0 if data.startswith(joined) else 1 if (b" " + data).startswith(joined) else None
        if shift is not None:
            out, pos = [], -shift
            for p in pieces:
                out.append((max(pos, 0), max(pos + len(p), 0)))
                pos += len(p)
            return out
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][:len(ids)]
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode()))
    out, last = [], 0
    for a, b in offsets:
        a, b = char_to_byte[a], char_to_byte[b]
        a, b = max(a, last), max(b, last)
        out.append((a, b))
        last = b
    return out


def groups(s_spans: list[tuple[int, int]], t_spans: list[tuple[int, int]]) -> list[tuple[range, range]]:
    """Two-pointer walk over both tokenizations' end offsets: (student tokens, teacher tokens) of
    each group, closed where both end at the same byte. Tokens left over when one side ends (a
    text cut short on one side) form a last group."""
    out = []
    s = t = s0 = t0 = 0
    while s < len(s_spans) and t < len(t_spans):
        a, b = s_spans[s][1], t_spans[t][1]
        if a < b:
            s += 1
        elif a > b:
            t += 1
        else:
            s, t = s + 1, t + 1
            out.append((range(s0, s), range(t0, t)))
            s0, t0 = s, t
    if s0 < len(s_spans) or t0 < len(t_spans):
        out.append((range(s0, len(s_spans)), range(t0, len(t_spans))))
    return out


def pairs(s_spans, t_spans, t_usable=None) -> list[int]:
    """For each student token, the teacher token that starts the same group at the same byte
    (both predicted from the same text), else NONE. t_usable: which teacher tokens have a
    prediction (None: all); a zero-width one without (an HTTP teacher's piece of a character,
    see generate.write_topk_cache) hands the group start to the next one at that byte."""
    out = [NONE] * len(s_spans)
    for s, t in groups(s_spans, t_spans):
        if not len(s):
            continue
        start = s_spans[s[0]][0]
        u = next((u for u in t if t_spans[u][0] == start and (t_usable is None or t_usable[u])), None)
        if u is not None:
            out[s[0]] = u
    return out


class VocabMap:
    """Teacher tokens -> student token ids, by bytes (module docstring): exact, else the
    student's longest token that is a prefix, else NONE; the teacher's stop tokens -> the
    student's EOS."""

    def __init__(self, student_tokenizer, student_vocab: list[bytes | None] | None = None):
        vocab = student_vocab if student_vocab is not None else token_bytes(student_tokenizer)
        pieces = student_tokenizer.convert_ids_to_tokens(list(range(len(vocab))))
        fallback = {i for i, p in enumerate(pieces) if isinstance(p, str) and len(p) == 6
                    and p.startswith("<0x") and p.endswith(">")}
        special = set(student_tokenizer.all_special_ids)
        self.index: dict[bytes, int] = {}
        # the token a tokenizer itself produces for these bytes: a regular one before a
        # byte-fallback one, before a special one (`<|endoftext|>` typed in text is rare)
        for group in ([i for i in range(len(vocab)) if i not in fallback and i not in special],
                      sorted(fallback), sorted(special)):
            for i in group:
                b = vocab[i]
                if b:
                    self.index.setdefault(b, i)
        self.longest = max((len(b) for b in self.index), default=0)
        self.eos = student_tokenizer.eos_token_id
        self.size = len(vocab)

    def student_id(self, piece: bytes | None) -> int:
        if not piece:
            return NONE
        got = self.index.get(piece)
        if got is not None:
            return got
        for n in range(min(len(piece) - 1, self.longest), 0, -1):
            got = self.index.get(piece[:n])
            if got is not None:
                return got
        return NONE

    def table(self, teacher_vocab: list[bytes | None], teacher_stops=()) -> list[int]:
        """The map of every teacher id (a list as long as `teacher_vocab`)."""
        out = [self.student_id(b) for b in teacher_vocab]
        for i in teacher_stops:
            if i is not None and 0 <= i < len(out) and self.eos is not None:
                out[i] = self.eos
        return out


def identity(table: list[int]) -> bool:
    return table == list(range(len(table)))


def map_rows(logprobs, ids, table):
    """Top-k teacher rows onto the student's vocabulary. logprobs (N, k) float, ids (N, k) long
    teacher ids (a row of -inf log-probs: no teacher prediction), table (V_t,) long student id or
    NONE. Returns (logprobs (N, k), ids (N, k)): teacher tokens mapped to the same student token
    merged into the first column that holds it (probabilities added), the other columns and the
    unmapped ones at -inf (their mass joins the tail bucket, slmkit.losses.tail_buckets)."""
    import torch

    lp = logprobs.float()
    sid = table[ids.clamp(0, len(table) - 1)]
    valid = torch.isfinite(lp) & (sid >= 0) & (ids >= 0) & (ids < len(table))
    sid = torch.where(valid, sid, torch.zeros_like(sid))
    k = sid.shape[1]
    same = (sid[:, :, None] == sid[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    first = torch.where(same, torch.arange(k).expand_as(same), k).min(-1).values  # (N, k)
    first = torch.where(valid, first, torch.arange(k).expand_as(first))
    mass = torch.zeros_like(lp).scatter_add(1, first, torch.where(valid, lp.exp(), torch.zeros_like(lp)))
    alone = same.sum(-1) == 1  # no merge: keep the exact log-prob (no exp/log round trip)
    head = valid & (first == torch.arange(k))
    out = torch.where(alone, lp, mass.clamp_min(1e-45).log())
    out = torch.where(head, out, torch.full_like(out, float("-inf")))
    return out, sid


# --------------------------------------------------------------------------- examples

def aligned_text(example) -> str:
    """The text both models read after their own prompts: a pair's answer, or plain text. Chat
    messages (several turns, each template's markers inside the text) are not aligned."""
    from slmkit.errors import UsageError

    if example.messages is not None:
        raise UsageError(f"{example.where}: chat `messages` are not aligned across tokenizers; "
                         "give the data as {\"input\", \"output\"} pairs (or a --task's fields)")
    return example.text if example.text is not None else example.answer or ""


def text_key(example) -> str:
    """What a text-keyed teacher cache (slmkit.topk_cache) files an example under: its prompt
    text (before any chat template) and the aligned text, so any tokenizer finds it."""
    import hashlib

    blob = json.dumps([example.prompt, aligned_text(example)], ensure_ascii=False)
    return "T" + hashlib.sha1(blob.encode()).hexdigest()[:20]


def position_spans(example, tokenizer, ids: list[int], mask: list[int],
                   vocab: list[bytes | None]) -> list[tuple[int, int] | None]:
    """For each position of `ids, mask` (data.encode of `example`), the byte range of the
    aligned text its token covers, None for prompt tokens. The end-of-sequence token after an
    answer covers the sentinel byte range (L, L + 1), L the answer's length in bytes."""
    from slmkit.data import _ids

    text = aligned_text(example)
    if example.text is not None:  # every token is the text's
        return list(spans(tokenizer, text, ids, vocab))
    own = _ids(tokenizer, text)
    size = len(text.encode())
    sp = spans(tokenizer, text, own, vocab) + [(size, size + 1)]  # the EOS that follows
    counted = [i for i, m in enumerate(mask) if m]
    out: list[tuple[int, int] | None] = [None] * len(ids)
    for j, i in enumerate(counted):
        out[i] = sp[j] if j < len(sp) else None
    return out


def prediction_pairs(s_spans, t_spans) -> list[int]:
    """Student positions -> teacher positions with the same context: for each counted student
    prediction (position i >= 1 whose token has a span, in order), the index of the teacher's
    counted prediction it pairs with (same order on the teacher side), else NONE.
    s_spans, t_spans: position_spans of either side."""
    def predicted(sp):
        return [i for i in range(1, len(sp)) if sp[i] is not None]

    def tokens(sp):  # the aligned tokens, in order (a plain text's first one included)
        return [i for i in range(len(sp)) if sp[i] is not None]

    s_tok, t_tok = tokens(s_spans), tokens(t_spans)
    tok_pair = pairs([s_spans[i] for i in s_tok], [t_spans[i] for i in t_tok])
    t_row = {i: r for r, i in enumerate(predicted(t_spans))}
    at = {i: tok_pair[j] for j, i in enumerate(s_tok)}
    out = []
    for i in predicted(s_spans):
        u = at[i]
        out.append(t_row.get(t_tok[u], NONE) if u != NONE else NONE)
    return out


def text_spans(pieces: list[str], text: str) -> list[tuple[int, int]] | None:
    """Byte spans in `text` of tokens known only by their text (an HTTP teacher's completion),
    or None where they do not spell it. `text` may lack the completion's leading and trailing
    whitespace (a stored answer is stripped). A server sends a token that holds part of a
    character as U+FFFD: a run of such tokens covers whatever the text has between its clean
    neighbours; its first token gets that span, the others an empty span at its end."""
    import re

    dirty = ["\ufffd" in p for p in pieces]
    solid = [i for i, p in enumerate(pieces) if p.strip() or dirty[i]]
    if not solid:
        return None
    first, last = solid[0], solid[-1]
    parts = []
    for i, p in enumerate(pieces):
        if dirty[i]:
            parts.append("()" if i > 0 and dirty[i - 1] else "(.+?)")
        elif i < first or i > last:
            parts.append(r"(\s*)")  # whitespace the stored answer stripped
        else:
            body = re.escape(p.lstrip() if i == first else p)
            body = body if i != last else re.escape((p.lstrip() if i == first else p).rstrip())
            parts.append(f"({body})")
    m = re.fullmatch("".join(parts), text, flags=re.DOTALL)
    if m is None:
        return None
    to_byte = [0]
    for ch in text:
        to_byte.append(to_byte[-1] + len(ch.encode()))
    out = []
    for g in range(1, len(pieces) + 1):
        a, b = m.span(g)
        out.append((to_byte[a], to_byte[b]))
    return out
