"""One teacher interface for `slm distill`: whatever the teacher is, it gives the loss the
teacher's side of one micro-batch (`inputs`), and `prepare` readies the examples for it.

                 same tokenizer as the student          any tokenizer (the text path)
    a model      ModelTeacher: its logits, token by     TextModelTeacher: it reads each example
                 token (and hidden states, prompt KD)   in its own template; its distributions
                                                        at the paired positions, mapped
    a file       V1CacheTeacher: rows by student id     CacheTeacher: text-keyed top-k rows
                 (`slmkit-topk-v1`, read only)          (`slmkit-topk-v2`), mapped
    a server     served_teacher.ServedTeacher:      ServedTextTeacher: the same requests, the
                 vLLM's prompt_logprobs by token id     examples encoded here with the teacher's
                                                        tokenizer (--teacher-tokenizer), mapped
    (a teacher of another family can also write its top-k while it writes the data: `slm generate`)

The text path (slmkit.align): both models read the same answer text after their own prompts;
each student prediction made after the same text as a teacher prediction is paired with it, and
the teacher's distribution is moved onto the student's vocabulary. `load` picks the kind.
"""

from __future__ import annotations

from typing import NamedTuple

from slmkit import align


class Batch(NamedTuple):
    """A collated micro-batch as the student saw it (slmkit.batching.collate, on the device)."""
    ids: object
    att: object
    window: object   # (B, W) the positions whose logits the student computed (distill.logits_window)
    pos: object
    answer: object   # (B, K) bool: the counted positions of the window's K columns
    states: bool     # --hidden-kd: the teacher's hidden states are wanted too


class KDInputs(NamedTuple):
    loss: dict       # the teacher's keyword arguments of losses.loss_sums
    states: object = None  # --hidden-kd: the teacher's hidden states (ModelTeacher only)


def load(cfg, text_path: bool, student, tokenizer, device, vocab: int | None = None):
    """The teacher `cfg` names (None: no teacher distributions are needed), its model loaded.
    vocab: the pair's shared real vocabulary (models.shared_vocab) on the direct path; a
    teacher whose config pads it further is cut to it (models.fit_head)."""
    from slmkit import models
    from slmkit.served_teacher import ServedTeacher, is_served

    size = student.get_output_embeddings().weight.shape[0]  # the student's logits
    if cfg.teacher_cache and cfg.alpha_ce < 1:
        return CacheTeacher(cfg.teacher_cache, tokenizer) if text_path else \
            V1CacheTeacher(cfg.teacher_cache, tokenizer, cfg)
    if not cfg.teacher or cfg.alpha_ce >= 1:
        return None
    if is_served(cfg.teacher) and text_path:
        t_tok = models.load_tokenizer(models.resolve(cfg.teacher_tokenizer, cfg.trust_remote_code),
                                      cfg.trust_remote_code)
        return ServedTextTeacher(cfg.teacher, t_tok, tokenizer, cfg.top_k, cfg.max_length)
    if is_served(cfg.teacher):
        return ServedTeacher(cfg.teacher, tokenizer, cfg.top_k, vocab_size=size)
    from slmkit.distill import teacher_dtype

    model, t_tok = models.load_model(cfg.teacher, dtype=teacher_dtype(cfg, device), device=device,
                                     trust_remote_code=cfg.trust_remote_code)
    model.requires_grad_(False)  # frozen, eval mode: no dropout, no grads, no optimizer state
    if text_path:
        return TextModelTeacher(model, t_tok, tokenizer, size, device, cfg.max_length)
    models.fit_head(model, vocab or size)
    return ModelTeacher(model)


def pair_up(items, examples, tokenizer, t_tok, t_vocab, max_length: int) -> None:
    """Each student item gets its spans, `.teacher` (the teacher's encoding of the same example,
    its prompt in the teacher's template) and `.align` (align.prediction_pairs)."""
    from slmkit.batching import Encoded
    from slmkit.data import encode

    student_spans(items, examples, tokenizer, align.token_bytes(tokenizer))
    for e, ex in zip(items, examples):
        ids, mask = encode(ex, t_tok, max_length=max_length)
        t = Encoded(ids, mask, e.key, e.where)
        t.spans = align.position_spans(ex, t_tok, ids, mask, t_vocab)
        e.teacher = t
        e.align = align.prediction_pairs(e.spans, t.spans)


def student_spans(items, examples, tokenizer, vocab) -> None:
    """Give each student item (batching.Encoded) the byte spans of its positions and its text key."""
    for e, ex in zip(items, examples):
        e.spans = align.position_spans(ex, tokenizer, e.ids, e.mask, vocab)
        e.key = align.text_key(ex)


class ModelTeacher:
    """A local model of the student's tokenizer: the same batch, position by position."""

    def __init__(self, model):
        self.model = model

    def prepare(self, items, examples, tokenizer, held: bool) -> None:
        pass

    def inputs(self, run, items, b: Batch) -> KDInputs:
        import torch

        from slmkit.distill import final_hidden, logits_window, projector

        with final_hidden(self.model) as head, run.autocast(), torch.no_grad():
            hidden, _, _, states = logits_window(self.model, b.ids, b.att, b.window, b.pos, b.states)
        return KDInputs({"teacher_logits": hidden,
                         "teacher_head": projector(head, run.device, run.cfg.bf16, grad=False)}, states)


class V1CacheTeacher:
    """A `slmkit-topk-v1` file: rows by the student's token ids, keyed by data line."""

    def __init__(self, path, tokenizer, cfg):
        from slmkit import topk_cache
        from slmkit.distill import vocab_hash

        self.file = topk_cache.open_v1(path, vocab_hash(tokenizer), cfg.data, cfg)

    def prepare(self, items, examples, tokenizer, held: bool) -> None:
        pass

    def inputs(self, run, items, b: Batch) -> KDInputs:
        from slmkit import topk_cache

        return KDInputs({"teacher_topk": topk_cache.v1_rows(self.file, items, run.device)})


class TextModelTeacher:
    """A local model of any tokenizer, aligned on the text; its full distributions are mapped
    (losses.mapped_kd), so --temperature applies."""

    def __init__(self, model, tokenizer, student_tokenizer, student_size: int, device,
                 max_length: int = 1024):
        from slmkit import losses, models

        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.vocab = align.token_bytes(tokenizer)
        size = model.get_output_embeddings().weight.shape[0]  # logits, padding ids included
        table = align.VocabMap(student_tokenizer).table(self.vocab, models.stop_ids(model, tokenizer))
        table += [align.NONE] * (size - len(table))
        self.table = losses.VocabTable(table[:size], student_size, device)

    def prepare(self, items, examples, tokenizer, held: bool) -> None:
        pair_up(items, examples, tokenizer, self.tokenizer, self.vocab, self.max_length)

    def inputs(self, run, items, b: Batch) -> KDInputs:
        """The teacher reads its own encodings of the items; its final hidden states at the
        predictions paired with the student's counted positions are placed at those positions
        (zeros and kd_mask False where a position has no pair)."""
        import torch

        from slmkit.batching import collate
        from slmkit.distill import final_hidden, logits_window, projector

        device = run.device
        t_items = [e.teacher for e in items]
        ids, att, mask, pos = (t.to(device) for t in collate(t_items, self.tokenizer.pad_token_id))
        with final_hidden(self.model) as head, run.autocast(), torch.no_grad():
            hidden, _, t_mask, _ = logits_window(self.model, ids, att, mask, pos)
            rows = hidden[t_mask]  # (M_t, H): each item's counted predictions, in order
        index, start = [], 0
        for e in items:
            index += [start + a if a >= 0 else -1 for a in e.align]
            start += e.teacher.targets
        index = torch.tensor(index, dtype=torch.long, device=device)
        aligned = rows.new_zeros(*b.answer.shape, rows.shape[-1])
        aligned[b.answer] = rows[index.clamp(min=0)]
        kd_mask = torch.zeros_like(b.answer)
        kd_mask[b.answer] = index >= 0
        return KDInputs({"teacher_logits": aligned, "vocab_map": self.table, "kd_mask": kd_mask,
                         "teacher_head": projector(head, device, run.cfg.bf16, grad=False)})


class CacheTeacher:
    """A text-keyed top-k file (slmkit.topk_cache v2) from any teacher; its rows are mapped
    (align.map_rows) and scored with the tail bucket (losses.tail_buckets)."""

    def __init__(self, path, student_tokenizer):
        import torch

        from slmkit import topk_cache

        self.reader = topk_cache.Reader(path)
        table = align.VocabMap(student_tokenizer).table(self.reader.vocab, self.reader.stops)
        self.table = torch.tensor(table or [align.NONE], dtype=torch.long)

    def prepare(self, items, examples, tokenizer, held: bool) -> None:
        """Spans and text keys; every example must be in the file (found now, not mid-run)."""
        from slmkit.errors import UsageError

        student_spans(items, examples, tokenizer, align.token_bytes(tokenizer))
        keys = set(self.reader.file.keys())
        missing = [e for e in items if f"{e.key}.tokens" not in keys]
        if missing:
            raise UsageError(f"{missing[0].where}: not in the teacher cache `{self.reader.path}` "
                             f"(nor {len(missing) - 1} more lines): its prompt or answer text differs "
                             "from what the cache was made of; remake the cache on this data with "
                             "--cache-teacher (or slm generate --topk-logprobs)")

    def inputs(self, run, items, b: Batch) -> KDInputs:
        return KDInputs({"teacher_topk": self.rows(items, run.device)})

    def rows(self, items, device):
        """The mapped top-k rows of every counted position of `items`, in batch order:
        ((M, k) float32 with -inf for no outcome, (M, k) long student ids)."""
        import torch

        lps, idss = [], []
        for e in (part for item in items for part in item.segments):
            tokens, spans, ids, lp = self.reader.get(e.key, e.where)
            t_spans = [tuple(s) for s in spans]  # a row per teacher token: row j predicts token j
            s_tok = [i for i, s in enumerate(e.spans) if s is not None]
            usable = torch.isfinite(lp).any(-1).tolist()
            at = dict(zip(s_tok, align.pairs([e.spans[i] for i in s_tok], t_spans, usable)))
            predicted = [i for i in range(1, len(e.spans)) if e.spans[i] is not None]
            pick = torch.tensor([at[i] for i in predicted], dtype=torch.long)
            if not len(t_spans):  # the teacher has nothing of this text: CE only
                lps.append(torch.full((len(pick), self.reader.k), float("-inf")))
                idss.append(torch.zeros((len(pick), self.reader.k), dtype=torch.long))
                continue
            row_lp = lp[pick.clamp(min=0)]
            row_lp[pick < 0] = float("-inf")
            mapped_lp, mapped_ids = align.map_rows(row_lp, ids[pick.clamp(min=0)], self.table)
            lps.append(mapped_lp)
            idss.append(mapped_ids)
        return torch.cat(lps).to(device), torch.cat(idss).to(device)


class ServedTextTeacher:
    """A served teacher of another tokenizer, named locally by --teacher-tokenizer: each example
    is encoded here in the teacher's own template, scored by the server (prompt_logprobs by
    token id, as served_teacher.ServedTeacher asks: vLLM, slm serve), and its top-k rows at the
    paired positions are mapped like a cache's. Rows are streamed, the held-out ones kept."""

    def __init__(self, spec: str, tokenizer, student_tokenizer, k: int, max_length: int):
        import torch

        from slmkit.served_teacher import ServedTeacher

        self.server = ServedTeacher(spec, tokenizer, k, vocab_size=len(tokenizer))
        self.tokenizer, self.max_length = tokenizer, max_length
        self.vocab = align.token_bytes(tokenizer)
        table = align.VocabMap(student_tokenizer).table(self.vocab, [tokenizer.eos_token_id])
        self.table = torch.tensor(table, dtype=torch.long)

    def prepare(self, items, examples, tokenizer, held: bool) -> None:
        pair_up(items, examples, tokenizer, self.tokenizer, self.vocab, self.max_length)
        if held:
            self.server.keep |= {tuple(e.teacher.ids) for e in items}

    def inputs(self, run, items, b: Batch) -> KDInputs:
        import torch

        lps, idss = [], []
        for e, (lp, ids) in zip(items, self.server.fetch([e.teacher.ids for e in items])):
            t = e.teacher
            rows = [i - 1 for i in range(1, len(t.spans)) if t.spans[i] is not None]
            pick = torch.tensor([rows[a] if a >= 0 else -1 for a in e.align], dtype=torch.long)
            row_lp = lp[pick.clamp(min=0)].clone()
            row_lp[pick < 0] = float("-inf")
            mapped = align.map_rows(row_lp, ids[pick.clamp(min=0)], self.table)
            lps.append(mapped[0])
            idss.append(mapped[1])
        return KDInputs({"teacher_topk": (torch.cat(lps).to(run.device), torch.cat(idss).to(run.device))})
