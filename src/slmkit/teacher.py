"""The teacher as the text path of distillation sees it (slm distill --cross-tokenizer): whatever
it is, it predicts its own tokens of the same text, and slmkit.align moves those predictions onto
the student's positions and vocabulary.

    LocalTeacher   a model loaded here (HF folder, GGUF, packaged name): it reads each example in
                   its own chat template; its full distributions are mapped (losses.mapped_kd)
    CacheTeacher   a text-keyed top-k file (slmkit.topk_cache), written once by any teacher;
                   its top-k rows are mapped (align.map_rows, losses.tail_buckets)

Both attach to each student item what the loss needs: `LocalTeacher.encode` the teacher's own
encoding and the position pairs, `CacheTeacher.rows` the mapped rows of a batch.
"""

from __future__ import annotations

from slmkit import align


def student_spans(items, examples, tokenizer, vocab) -> None:
    """Give each student item (distill.Encoded) the byte spans of its positions and its text key."""
    for e, ex in zip(items, examples):
        e.spans = align.position_spans(ex, tokenizer, e.ids, e.mask, vocab)
        e.key = align.text_key(ex)


class LocalTeacher:
    def __init__(self, model, tokenizer, student_tokenizer, student_size: int, device):
        from slmkit import losses, models

        self.model, self.tokenizer = model, tokenizer
        self.vocab = align.token_bytes(tokenizer)
        size = model.get_output_embeddings().weight.shape[0]  # logits, padding ids included
        table = align.VocabMap(student_tokenizer).table(self.vocab, models.stop_ids(model, tokenizer))
        table += [align.NONE] * (size - len(table))
        self.table = losses.VocabTable(table[:size], student_size, device)

    def encode(self, items, examples, max_length: int) -> None:
        """Each student item gets `.teacher` (the teacher's encoding of the same example, its
        prompt in the teacher's template) and `.align` (align.prediction_pairs)."""
        from slmkit.data import encode
        from slmkit.distill import Encoded

        for e, ex in zip(items, examples):
            ids, mask = encode(ex, self.tokenizer, max_length=max_length)
            t = Encoded(ids, mask, e.key, e.where)
            t.spans = align.position_spans(ex, self.tokenizer, ids, mask, self.vocab)
            e.teacher = t
            e.align = align.prediction_pairs(e.spans, t.spans)


class CacheTeacher:
    def __init__(self, path, student_tokenizer):
        import torch

        from slmkit import topk_cache

        self.reader = topk_cache.Reader(path)
        table = align.VocabMap(student_tokenizer).table(self.reader.vocab, self.reader.stops)
        self.table = torch.tensor(table or [align.NONE], dtype=torch.long)

    def rows(self, items, device):
        """The mapped top-k rows of every counted position of `items`, in batch order:
        ((M, k) float32 with -inf for no outcome, (M, k) long student ids)."""
        import torch

        lps, idss = [], []
        for e in (part for item in items for part in item.segments):
            tokens, spans, ids, lp = self.reader.get(e.key, e.where)
            # the teacher's rows are per aligned token; position j + 1 of a row list predicts
            # token j + 1: present them as position spans with a prompt-free sequence
            t_spans = [tuple(s) for s in spans]
            pair = align.pairs([s for s in e.spans if s is not None], t_spans)
            s_tok = [i for i, s in enumerate(e.spans) if s is not None]
            at = dict(zip(s_tok, pair))
            predicted = [i for i in range(1, len(e.spans)) if e.spans[i] is not None]
            if len(predicted) != e.targets:
                raise AssertionError(f"{e.where}: {len(predicted)} aligned predictions for {e.targets} targets")
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
