"""Distillation losses: pure functions, shapes in the docstrings, all values in nats.

Notation: p is the teacher's next-token distribution, q the student's, both at temperature tau
(logits divided by tau). N is a number of token positions, V the vocabulary, k the top-k size.

- forward KL   KL(p || q) = sum_v p (log p - log q)     mode-covering; Minitron's best, tau = 1
- reverse KL   KL(q || p) = sum_v q (log q - log p)     mode-seeking (MiniLLM)
- JSD(beta)    beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD,
               arXiv 2306.13649, same convention as TRL). beta = 0 is defined as forward KL and
               beta = 1 as reverse KL exactly (the mixture formula itself degenerates to 0 at both
               ends: near beta = 0 it behaves like beta * forward KL, near 1 like (1-beta) * reverse).

Divergences at temperature tau are multiplied by tau**2 (Hinton et al.), so gradient sizes do
not depend on tau. The training loss is `(1 - alpha_ce) * KD + alpha_ce * CE`, each a mean over
answer tokens; alpha_ce = 1 needs no teacher at all.

Memory: for a (tokens x 49152) vocabulary, each float32 copy of the logits is ~200 KB per token
(1 MB at Gemma's 262,144). `loss_sums` therefore visits the masked positions `chunk` at a time
and wraps each chunk in activation checkpointing, so the float32 copies of only one chunk are
alive at once (recomputed in backward). Given the models' final hidden states and output
projections (`head`, `teacher_head`) instead of logits, it also applies the projections per chunk,
so no (batch x length x vocabulary) tensor exists at all: memory grows with chunk x vocabulary.

Sparse (offline) teacher: only the teacher's top-k log-probs per position are stored. We use the
*tail bucket* method: both distributions are coarsened to k + 1 outcomes, the k teacher tokens
plus one bucket "everything else", whose teacher mass is 1 - sum(top-k probs) and whose student
log-mass is the logsumexp of the student's log-probs over the other V - k tokens (computed
directly: `1 - sum(exp)` in float32 cancels to 0 when the top-k hold nearly all the mass). The
divergence between the coarsened distributions is exact and never exceeds the full divergence
(data-processing inequality). It equals the full divergence exactly when teacher and student
spread their tail masses over the tail tokens in the same proportions; so for forward KL and JSD
whenever the teacher's tail is empty (the tail terms are then linear in the student's tail mass).
Not for reverse KL: there an empty teacher tail makes the full divergence infinite wherever the
student puts mass in the tail, while the bucket, with the teacher's tail floored at 1e-8, stays a
finite surrogate. Unlike renormalising over the top-k, the bucket still pushes the student's mass
out of tokens the teacher finds unlikely. Both tail masses are floored at 1e-8 (TAIL_FLOOR).
Cached log-probs are at tau = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAIL_FLOOR = 1e-8  # smallest tail-bucket mass (see tail_buckets)


def _kl(logp, logq):
    """KL(P || Q) per row from log-probs (N, C) -> (N,); rows where P = 0 contribute 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


KINDS = ("forward_kl", "reverse_kl", "jsd")  # distill.LOSSES repeats it without importing torch


def divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher log-probs `logp` (N, C) and student log-probs
    `logq` (N, C) -> (N,) in nats. `kind` is forward_kl, reverse_kl or jsd (with `beta`)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl(logp, logq)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl(logq, logp)
    if kind == "jsd":
        # log m computed in log space: m = beta p + (1 - beta) q
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), 0)
        return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    raise ValueError(f"unknown divergence `{kind}`; choose one of {', '.join(KINDS)}")


def dense_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
             beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KD loss from full logits: student (N, V), teacher (N, V) -> (N,), scaled by tau**2."""
    t = temperature
    logq = F.log_softmax(student_logits.float() / t, dim=-1)
    logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return divergence(logp, logq, kind, beta) * t * t


def tail_buckets(logprobs: torch.Tensor, ids: torch.Tensor, full_logq: torch.Tensor):
    """Coarsen to k + 1 outcomes (the tail bucket method above).
    logprobs: teacher top-k log-probs (N, k), -inf for a column that is no outcome (then its id
    is ignored; a row of -inf alone gives divergence 0: one bucket on both sides); ids: their
    token ids (N, k) long, distinct per row among the finite columns; full_logq: student
    log-probs (N, V). Returns (logp, logq), each (N, k + 1), last column the tail."""
    logp = logprobs.float()
    logq = full_logq.gather(-1, ids)
    # teacher: all we know is 1 - sum(top-k), floored at TAIL_FLOOR (float16 storage can push the
    # sum past 1, and an empty bucket would make reverse KL / JSD infinite)
    p_tail = (1 - logp.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR).log()
    valid = torch.isfinite(logp)
    if bool(valid.all()):
        # student: the exact log-mass of the other V - k tokens, floored like the teacher's
        q_tail = full_logq.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    else:  # -inf columns (slmkit.align.map_rows) are no outcome: their ids stay in the tail
        logq = torch.where(valid, logq, torch.full_like(logq, float("-inf")))
        taken = torch.zeros_like(full_logq).scatter_add(-1, ids, valid.to(full_logq.dtype)) > 0
        q_tail = full_logq.masked_fill(taken, float("-inf")).logsumexp(-1, keepdim=True)
    q_tail = q_tail.clamp(min=math.log(TAIL_FLOOR))
    return torch.cat([logp, p_tail], -1), torch.cat([logq, q_tail], -1)


def sparse_kd(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
              kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-token KD loss from a sparse teacher: student (N, V), teacher top-k log-probs (N, k) at
    tau = 1 and their ids (N, k) -> (N,), the divergence of the k + 1 bucket distributions."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    logp, logq_b = tail_buckets(topk_logprobs, topk_ids.long(), logq)
    return divergence(logp, logq_b, kind, beta)


def mapped_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_map: "VocabTable",
              kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KD across vocabularies (slmkit.align): student (N, V_s), teacher (N, V_t) logits
    -> (N,), scaled by tau**2. The teacher's probabilities move onto the student tokens
    `vocab_map` sends them to (added where several land on one); the divergence is over those
    student tokens plus one tail bucket: the teacher's unmapped mass against the student's mass on
    every other token, both floored at TAIL_FLOOR. Where one teacher token alone maps to a student
    token its log-prob is used as is, so an identity map gives dense_kd exactly."""
    t, m = temperature, vocab_map
    if m.identity:  # a same-tokenizer pair on the text path: nothing to move
        return dense_kd(student_logits, teacher_logits, kind, beta, temperature)
    logq = F.log_softmax(student_logits.float() / t, dim=-1)
    logp_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    mass = logp_t.new_zeros(logp_t.shape[0], m.student_size).index_add_(
        1, m.target, logp_t[:, m.mapped].exp())
    logp = mass[:, m.image].clamp_min(1e-45).log()
    logp[:, m.single_pos] = logp_t[:, m.single_src]
    p_tail = (logp_t[:, m.unmapped].logsumexp(-1, keepdim=True) if m.unmapped.numel()
              else logp_t.new_full((logp_t.shape[0], 1), float("-inf")))
    q_tail = (logq[:, m.outside].logsumexp(-1, keepdim=True) if m.outside.numel()
              else logq.new_full((logq.shape[0], 1), float("-inf")))
    floor = math.log(TAIL_FLOOR)
    logp = torch.cat([logp, p_tail.clamp(min=floor)], -1)
    logq = torch.cat([logq[:, m.image], q_tail.clamp(min=floor)], -1)
    return divergence(logp, logq, kind, beta) * t * t


class VocabTable:
    """A teacher -> student vocabulary map (slmkit.align.VocabMap.table) as index tensors for
    mapped_kd: `mapped` teacher ids and their `target` student ids, `unmapped` teacher ids, the
    student tokens that receive mass (`image`, sorted) and those that do not (`outside`), and
    where exactly one teacher token lands (`single_pos` into image, `single_src` teacher id)."""

    def __init__(self, table, student_size: int, device=None):
        table = torch.as_tensor(table, dtype=torch.long)
        ok = table >= 0
        self.student_size = student_size
        self.identity = len(table) == student_size and bool((table == torch.arange(len(table))).all())
        self.mapped = ok.nonzero().squeeze(1)
        self.target = table[self.mapped]
        self.unmapped = (~ok).nonzero().squeeze(1)
        count = torch.bincount(self.target, minlength=student_size)
        self.image = (count > 0).nonzero().squeeze(1)
        self.outside = (count == 0).nonzero().squeeze(1)
        where = torch.full((student_size,), -1, dtype=torch.long)
        where[self.image] = torch.arange(self.image.numel())
        one = count[self.target] == 1
        self.single_src = self.mapped[one]
        self.single_pos = where[self.target[one]]
        if device is not None:
            for k, v in vars(self).items():
                if isinstance(v, torch.Tensor):
                    setattr(self, k, v.to(device))


def token_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy: logits (N, V), labels (N,) long -> (N,) in nats."""
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


def _chunk_sums(s, labels, teacher, topk_lp, topk_ids, kind, beta, temperature, need_kd,
                head=None, teacher_head=None, w=None, vocab_map=None, kd_w=None):
    """Sum of KD and CE over one chunk of positions; s (n, V) logits, or (n, H) hidden states
    that `head` maps to logits (likewise `teacher` and `teacher_head`); w (n,) weights each
    position's terms (None: 1); `vocab_map` (VocabTable) a teacher of another vocabulary; kd_w
    (n,) 0/1 the positions with a teacher prediction (None: all). Returns a (2,) tensor."""
    if head is not None:
        s = head(s)
    if teacher is not None and teacher_head is not None:
        teacher = teacher_head(teacher)

    def total(x):  # (n,) per position -> weighted sum
        return x.sum() if w is None else (x * w).sum()

    ce = total(token_ce(s, labels))
    if not need_kd:
        return torch.stack([torch.zeros_like(ce), ce])
    if teacher is not None and vocab_map is not None:
        per = mapped_kd(s, teacher, vocab_map, kind, beta, temperature)
    elif teacher is not None:
        per = dense_kd(s, teacher, kind, beta, temperature)
    else:
        per = sparse_kd(s, topk_lp, topk_ids, kind, beta)
    kd = total(per if kd_w is None else per * kd_w)
    return torch.stack([kd, ce])


def loss_sums(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              teacher_logits: torch.Tensor | None = None,
              teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
              kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
              chunk: int = 512, head=None, teacher_head=None,
              weights: torch.Tensor | None = None, vocab_map: VocabTable | None = None,
              kd_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed KD and CE over the masked positions, visited `chunk` positions at a time.

    student_logits: (B, T, V), already aligned so position t predicts labels[:, t]; or, with
                  `head` ((n, H) -> (n, V) logits, the output projection), hidden states (B, T, H)
    teacher_head: the same for teacher_logits
    labels: (B, T) long; mask: (B, T) bool/0-1, 1 where the token counts (answer, not padding)
    teacher_logits: (B, T, V) aligned like the student's, or
    teacher_topk: (logprobs (M, k), ids (M, k)) for the M = mask.sum() masked positions in
                  row-major order (the order `mask.nonzero()` gives)
    weights: (B, T) float, each masked position's weight in both sums (None: every one 1)
    vocab_map: with teacher_logits of another vocabulary (V_t), the map onto the student's
                  (VocabTable, see mapped_kd)
    kd_mask: (B, T) bool, the masked positions that have a teacher prediction (cross-tokenizer:
                  slmkit.align.pairs); the others add CE only (None: all)
    Returns (kd_sum, ce_sum, n_tokens); divide by the token count for means. Without a teacher
    kd_sum is 0.
    """
    from torch.utils.checkpoint import checkpoint

    rows, cols = mask.bool().nonzero(as_tuple=True)
    need_kd = teacher_logits is not None or teacher_topk is not None
    total = student_logits.new_zeros(2, dtype=torch.float32)
    for i in range(0, rows.numel(), chunk):
        r, c = rows[i:i + chunk], cols[i:i + chunk]
        args = (student_logits[r, c], labels[r, c],
                teacher_logits[r, c] if teacher_logits is not None else None,
                teacher_topk[0][i:i + chunk] if teacher_topk is not None else None,
                teacher_topk[1][i:i + chunk] if teacher_topk is not None else None,
                kind, beta, temperature, need_kd, head, teacher_head,
                weights[r, c].float() if weights is not None else None, vocab_map,
                kd_mask[r, c].float() if kd_mask is not None else None)
        if student_logits.requires_grad:
            total = total + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            total = total + _chunk_sums(*args)
    return total[0], total[1], int(rows.numel())


def mix(kd_mean: torch.Tensor, ce_mean: torch.Tensor, alpha_ce: float) -> torch.Tensor:
    """The training loss: (1 - alpha_ce) * KD + alpha_ce * CE (both means over answer tokens)."""
    if alpha_ce >= 1:
        return ce_mean
    if alpha_ce <= 0:
        return kd_mean
    return (1 - alpha_ce) * kd_mean + alpha_ce * ce_mean


def hidden_distance(student_states, teacher_states, mask: torch.Tensor) -> torch.Tensor:
    """Intermediate-layer distillation (TinyBERT, arXiv 1909.10351; Minitron's intermediate-state
    loss, arXiv 2407.14679): how far each student layer's output is from the teacher layer it
    stands for. student_states, teacher_states: P matched pairs of hidden states (B, T, H) each;
    mask (B, T) bool, the positions that count. Returns sum over counted positions of
    mean over pairs of (1 - cos(student, teacher)), a 0-dim float32 tensor; divide by the number
    of counted positions for the mean. Cosine, not MSE: a pruned student's residual stream has
    another scale than its teacher's (fewer channels, rescaled norms) and a few channels of every
    Llama-style model carry activations 100x the rest, which MSE would spend itself on."""
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"{len(student_states)} student states for {len(teacher_states)} teacher states")
    total = mask.new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states):
        cos = F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-6)  # (B, T)
        total = total + (1 - cos)[mask].sum()
    return total / len(student_states)
