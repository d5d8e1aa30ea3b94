"""One log-likelihood scorer for `slm eval`: multiple choice, safety perplexity and `--ppl`.

A *span* is a token sequence and the position its scored part starts at: `score_spans` returns
the summed log-probability of ids[start:], each token given every token before it. Spans are
sorted by length and batched with right padding and an attention mask, so little compute goes
to padding and each row equals its unbatched computation to float tolerance (tested).

Multiple choice shares each question's context among its choices (lm-evaluation-harness's "one
context, many continuations"), `score_continuations`, in one of two ways (SHARED):
  packed  one row per question: the context, then every choice but its last token, with position
          ids restarting after the context and a 4D attention mask that lets each choice see the
          context and itself only (prefix sharing in one forward pass);
  cache   the contexts run once with use_cache; the KV cache is copied per choice and the choices
          run as continuations of it (two forward passes and a copy of the cache).
`packed` is the default: bench/eval_speed.py measured it faster on CPU (README).

Batch size: an integer is rows per forward pass; `auto` fills each pass up to a token budget
read from free memory (MemAvailable on CPU, cudaMemGetInfo on CUDA) and halves it after a CUDA
out-of-memory error. Every forward runs under `precision.autocast`; logits become float32
before the log-softmax (slmkit.precision).
"""

from __future__ import annotations

import sys

from slmkit.errors import UsageError

AUTO = "auto"
SHARED = ("packed", "cache", "none")
# Past a few thousand tokens a forward pass on a CPU is no faster per token and only costs memory;
# a GPU keeps gaining up to far larger passes.
CPU_MAX_TOKENS, CUDA_MAX_TOKENS = 4096, 65536
MAX_ROWS = 512
PICK_CHUNK = 256  # scored positions per vocabulary-sized block of logits
MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.8}  # of the free memory; a CPU host runs other programs


def parse_batch_size(value) -> int | str:
    """`auto` or a positive integer (from the command line or the API)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise UsageError(f"--batch-size {value}: give a positive number of sequences or `auto`")
    return n


def free_memory(device) -> int:
    """Bytes free on `device`: cudaMemGetInfo on CUDA, MemAvailable (Linux) or the physical pages
    the OS reports elsewhere."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_per_token(config) -> int:
    """Peak bytes one token of a no-grad forward pass adds: its logits three times (model dtype,
    the float32 copy, the log-softmax) and a few hidden- and MLP-sized activations."""
    vocab = config.vocab_size
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    return 4 * (3 * vocab + 4 * mlp + 16 * hidden)


def token_budget(model, device=None) -> int:
    """Tokens (rows x padded width) one forward pass may hold, from the free memory."""
    import torch

    device = torch.device(device or next(model.parameters()).device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    cap = CUDA_MAX_TOKENS if kind == "cuda" else CPU_MAX_TOKENS
    fits = int(free_memory(device) * MEMORY_SHARE[kind]) // bytes_per_token(model.config)
    return max(64, min(cap, fits))


def next_batch(lengths: list[int], order: list[int], pos: int, max_rows: int, max_tokens: int) -> int:
    """End (exclusive) of the batch that starts at order[pos]. `order` sorts rows longest first,
    so the first row's length is the batch's padded width; the batch grows while it has at most
    max_rows rows and rows x width <= max_tokens (always at least one row)."""
    width, end = lengths[order[pos]], pos + 1
    while end < len(order) and end - pos < max_rows and (end - pos + 1) * width <= max_tokens:
        end += 1
    return end


def _batches(model, lengths: list[int], batch_size, desc: str, unit: str, run) -> None:
    """Call run(indices) for each batch, longest rows first, with a progress bar over rows.
    With `auto`, a CUDA out-of-memory error halves the token budget and retries the batch."""
    import torch
    from tqdm import tqdm

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    auto = batch_size == AUTO
    max_rows, max_tokens = (MAX_ROWS, token_budget(model)) if auto else (int(batch_size), sys.maxsize)
    pos = 0
    with tqdm(total=len(order), desc=desc, unit=unit, file=sys.stderr, leave=False) as bar:
        while pos < len(order):
            end = next_batch(lengths, order, pos, max_rows, max_tokens)
            try:
                run(order[pos:end])
            except torch.OutOfMemoryError:
                if not auto or end - pos == 1:
                    raise
                torch.cuda.empty_cache()
                max_tokens = max(1, (end - pos) * lengths[order[pos]] // 2)
                continue
            bar.update(end - pos)
            pos = end


def _device(model):
    return next(model.parameters()).device


def _head(model):
    """The output head as a function of the decoder's final hidden states, so logits can be
    computed at the scored positions only: lm_head and the model's own logit processing
    (archs.output_head, the rule distill follows too). None when the model is not a decoder and a
    head, or processes its logits in a way the table does not know: the whole model runs then."""
    from slmkit import archs

    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or head is None:
        return None
    try:
        return archs.output_head(model, head)
    except UsageError:
        return None


def _forward(model, **kw):
    """One pass under autocast -> (states, output, head): the decoder's last hidden states
    (B, T, H) and the head to apply to them, or, without a separable head, the logits (B, T, V)
    and None. `output` carries the KV cache when use_cache is set."""
    import torch

    from slmkit.precision import autocast

    head = _head(model)
    with torch.no_grad(), autocast(_device(model)):
        if head is None:
            out = model(**kw)
            return out.logits, out, None
        out = model.get_decoder()(**kw)
    return out.last_hidden_state, out, head


def _pick(states, head, rows, cols, targets):
    """Log-probabilities of `targets` at (rows, cols) of states (B, T, H or V) -> (N,), float32.
    Logits are made PICK_CHUNK positions at a time: a vocabulary-sized block per position is
    most of a small model's memory traffic, and only scored positions need one."""
    import torch

    from slmkit.precision import autocast

    with torch.no_grad():
        picked = states[rows, cols]  # (N, H) or (N, V)
        targets = torch.as_tensor(targets, device=picked.device)
        out = []
        for i in range(0, len(picked), PICK_CHUNK):
            x = picked[i:i + PICK_CHUNK]
            if head is not None:
                with autocast(x.device):
                    x = head(x)
            logp = x.float().log_softmax(-1)  # float32 before the softmax (slmkit.precision)
            out.append(logp.gather(-1, targets[i:i + PICK_CHUNK, None])[:, 0])
        return torch.cat(out) if out else torch.zeros(0, device=picked.device)


def score_spans(model, spans: list[tuple[list[int], int]], batch_size=AUTO, pad_id: int = 0,
                desc: str = "log-likelihoods", unit: str = "seq") -> list[float]:
    """Summed log p(ids[start:] | ids[:start]) for each span (ids, start), 1 <= start < len(ids).
    The model reads ids[:-1] (B, T) right-padded; position t predicts token t+1."""
    import torch

    from slmkit.data import pad_batch

    for ids, start in spans:
        if not 1 <= start < len(ids):
            raise ValueError(f"span of {len(ids)} tokens cannot be scored from position {start}")
    device = _device(model)
    scores = [0.0] * len(spans)

    def run(idx):
        ids, att = pad_batch([spans[i][0][:-1] for i in idx], pad_id)
        rows, cols, targets = [], [], []
        for r, i in enumerate(idx):
            seq, start = spans[i]
            rows += [r] * (len(seq) - start)
            cols += range(start - 1, len(seq) - 1)
            targets += seq[start:]
        states, _, head = _forward(model, input_ids=ids.to(device), attention_mask=att.to(device))
        with torch.no_grad():
            lp = _pick(states, head, rows, cols, targets)
            sums = torch.zeros(len(idx), device=lp.device).index_add_(0, torch.as_tensor(rows, device=lp.device), lp)
        for r, i in enumerate(idx):
            scores[i] = sums[r].item()

    _batches(model, [len(s[0]) - 1 for s in spans], batch_size, desc, unit, run)
    return scores


def _packed_mask(segments, sdpa: bool):
    """4D attention mask (B, 1, L, L) for packed rows. segments (B, L): 0 context, j >= 1 the
    j-th continuation, -1 padding. A query sees earlier-or-equal keys of the context and of its
    own segment; padding sees itself only (a fully masked row would give NaN that 0-weights
    still carry into the other rows' sums). sdpa takes it as bool, eager as an additive float."""
    import torch

    B, L = segments.shape
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k != -1) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if sdpa:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def score_continuations(model, groups: list[tuple[list[int], list[list[int]]]], batch_size=AUTO,
                        pad_id: int = 0, shared: str = "packed", desc: str = "log-likelihoods") -> list[list[float]]:
    """Summed log p(continuation | context) for each (context ids, [continuation ids, ...]) group,
    the context scored once per group. Contexts and continuations must be non-empty."""
    if shared not in SHARED:
        raise ValueError(f"shared={shared!r}: one of {SHARED}")
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if shared == "packed" and impl not in ("sdpa", "eager"):
        shared = "cache"  # flash-attention kernels take no custom 4D mask
    if shared == "none":
        spans = [(ctx + c, len(ctx)) for ctx, conts in groups for c in conts]
        flat = iter(score_spans(model, spans, batch_size, pad_id, desc))
        return [[next(flat) for _ in conts] for _, conts in groups]
    for ctx, conts in groups:
        if not ctx or not conts or not all(conts):
            raise ValueError("a group needs a non-empty context and non-empty continuations")
    run = _packed_rows if shared == "packed" else _cached_rows
    out: list[list[float]] = [[] for _ in groups]
    lengths = [len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in groups]

    def batch(idx):
        for i, s in zip(idx, run(model, [groups[i] for i in idx], pad_id, impl == "sdpa")):
            out[i] = s

    _batches(model, lengths, batch_size, desc, "question", batch)
    return out


def _packed_rows(model, groups, pad_id: int, sdpa: bool) -> list[list[float]]:
    """One forward pass over rows `context + c1[:-1] + c2[:-1] + ...` (see the module doc)."""
    import torch


    device = _device(model)
    rows_ids, rows_pos, rows_seg, picks = [], [], [], []  # picks: (row, col, target, group, choice)
    for r, (ctx, conts) in enumerate(groups):
        ids, pos, seg, p = list(ctx), list(range(len(ctx))), [0] * len(ctx), len(ctx)
        for j, c in enumerate(conts):
            begin = len(ids)
            ids += c[:-1]
            pos += range(p, p + len(c) - 1)
            seg += [j + 1] * (len(c) - 1)
            # c[0] is predicted by the context's last token, c[t] by the packed copy of c[t-1]
            cols = [p - 1] + list(range(begin, begin + len(c) - 1))
            picks += [(r, col, tok, j) for col, tok in zip(cols, c)]
        rows_ids.append(ids), rows_pos.append(pos), rows_seg.append(seg)
    width = max(len(x) for x in rows_ids)
    pad = lambda xs, v: torch.tensor([x + [v] * (width - len(x)) for x in xs], device=device)  # noqa: E731
    ids, pos, seg = pad(rows_ids, pad_id), pad(rows_pos, 0), pad(rows_seg, -1)
    mask = _packed_mask(seg, sdpa).to(device)
    states, _, head = _forward(model, input_ids=ids, attention_mask=mask, position_ids=pos)
    lp = _pick(states, head, [p[0] for p in picks], [p[1] for p in picks], [p[2] for p in picks]).tolist()
    out = [[0.0] * len(conts) for _, conts in groups]
    for (r, _, _, j), v in zip(picks, lp):
        out[r][j] += v
    return out


def _cached_rows(model, groups, pad_id: int, sdpa: bool) -> list[list[float]]:
    """Contexts once with use_cache, then every choice as a continuation of its context's cache."""
    import torch

    from slmkit.data import pad_batch

    device = _device(model)
    ctx_ids, ctx_att = pad_batch([ctx for ctx, _ in groups], pad_id)
    ctx_len = torch.tensor([len(ctx) for ctx, _ in groups])
    owner = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [c for _, cs in groups for c in cs]
    states, first, head = _forward(model, input_ids=ctx_ids.to(device), attention_mask=ctx_att.to(device),
                                   use_cache=True)
    scores = _pick(states, head, owner, [int(ctx_len[g]) - 1 for g in owner], [c[0] for c in conts]).tolist()
    width = max(len(c) - 1 for c in conts)
    if width:
        cache = first.cache
        sel = torch.tensor(owner, device=device)
        cache.batch_select_indices(sel)
        x_ids, x_att = pad_batch([c[:-1] or [pad_id] for c in conts], pad_id)
        x_att = torch.tensor([[1] * (len(c) - 1) + [0] * (x_ids.shape[1] - len(c) + 1) for c in conts])
        att = torch.cat([ctx_att[owner], x_att], dim=1).to(device)
        pos = (ctx_len[owner][:, None] + torch.arange(x_ids.shape[1])[None]).to(device)
        states, _, head = _forward(model, input_ids=x_ids.to(device), attention_mask=att, position_ids=pos,
                                   use_cache=True, cache=cache)
        rows = [n for n, c in enumerate(conts) for _ in c[1:]]
        cols = [t for c in conts for t in range(len(c) - 1)]
        if rows:
            lp = _pick(states, head, rows, cols, [tok for c in conts for tok in c[1:]])
            for n, v in zip(rows, lp.tolist()):
                scores[n] += v
    out, k = [], 0
    for _, cs in groups:
        out.append(scores[k:k + len(cs)])
        k += len(cs)
    return out
