"""PyTorch backend: a Hugging Face folder (or `default`) decoded with our own KV-cache loop.

Requests are decoded together as one left-padded batch (static batching): every row keeps its
own temperature, top_p, seed, stop strings, max_tokens and deadline, and a finished row is
dropped from the batch and its KV cache at once, so the others do not pay for it. Our own loop
rather than `model.generate` because `generate` takes one set of sampling parameters per batch
and cannot stream several rows at once.
"""

from __future__ import annotations

import random
import threading

from slmkit import models, precision
from slmkit.backends import (Backend, Completion, Request, TextTracker, TokenLogprobs, now,
                             stop_reason)


class HFBackend(Backend):
    batched = True

    def __init__(self, spec: str, name: str, device: str | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False):
        self.model, self.tokenizer = models.load_model(spec, dtype=dtype, device=device,
                                                       trust_remote_code=trust_remote_code)
        self.name = name
        self.device = self.model.device
        self.tokenizer.padding_side = "left"  # generation continues from the right end
        self.context_length = models.context_length(self.model.config)
        self.eos_ids = set(models.stop_ids(self.model, self.tokenizer))
        self.lock = threading.Lock()

    def prompt_ids(self, prompt) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt)["input_ids"]
        else:
            if not tok.chat_template:
                raise ValueError(f"model `{self.name}` has no chat template; send a plain "
                                 "prompt to /v1/completions instead")
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template wrote them
        if not ids:
            if tok.bos_token_id is None:
                raise ValueError("the prompt is empty")
            ids = [tok.bos_token_id]
        return ids

    def run(self, requests: list[Request]) -> list[Completion]:
        import torch

        with self.lock, torch.inference_mode(), precision.autocast(self.device):
            return self._run(requests)

    def _run(self, requests: list[Request]) -> list[Completion]:
        import torch
        from transformers import DynamicCache

        tok = self.tokenizer
        prompts = [self.prompt_ids(r.prompt) for r in requests]
        for p in prompts:
            if len(p) >= self.context_length:
                raise ValueError(f"the prompt has {len(p)} tokens; model `{self.name}` reads at "
                                 f"most {self.context_length - 1}")
        n, width = len(requests), max(map(len, prompts))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else random.getrandbits(63))
                for r in requests]
        out: list[list[int]] = [[] for _ in requests]
        lps: list[list[TokenLogprobs] | None] = [[] if r.logprobs else None for r in requests]
        trackers = [TextTracker(r.stop) for r in requests]
        done: list[Completion | None] = [None] * n
        active = list(range(n))  # batch row -> request index
        cache = DynamicCache(config=self.model.config)
        start = now()
        # pad positions get position 0; they are masked out anyway
        logits = self.model(input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        while True:
            logits = logits.float().cpu()  # (rows, vocab)
            step = torch.empty(len(active), dtype=torch.long)
            keep = []
            for row, i in enumerate(active):
                r = requests[i]
                t = pick(logits[row], r.temperature, r.top_p, gens[i])
                step[row] = t
                reason = None
                if t in self.eos_ids:
                    reason, piece = "stop", trackers[i].finish()
                else:
                    out[i].append(t)
                    if lps[i] is not None:
                        lps[i].append(self._logprobs(logits[row], t, r.logprobs))
                    piece, hit = trackers[i].update(tok.decode(out[i], skip_special_tokens=True))
                    reason = stop_reason(hit, r, len(prompts[i]), len(out[i]), self.context_length)
                    if reason and reason != "stop":
                        piece += trackers[i].finish()
                if piece and r.on_text:
                    r.on_text(piece)
                if reason:
                    done[i] = Completion(trackers[i].text, reason, len(prompts[i]), len(out[i]),
                                         out[i], lps[i], now() - start)
                else:
                    keep.append(row)
            if not keep:
                return done
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, step = mask[sel], step[keep]
                active = [active[row] for row in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self.model(input_ids=step[:, None].to(self.device), attention_mask=mask,
                                position_ids=mask.sum(-1, keepdim=True) - 1,
                                cache=cache, use_cache=True).logits[:, -1]

    def score_prompt(self, ids: list[int], k: int) -> list[dict | None]:
        import torch

        if not ids or len(ids) > self.context_length:
            raise ValueError(f"the prompt has {len(ids)} tokens; model `{self.name}` scores 1 to "
                             f"{self.context_length}")
        if min(ids) < 0 or max(ids) >= self.model.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.model.config.vocab_size})")
        x = torch.tensor([ids], device=self.device)
        with self.lock, torch.inference_mode(), precision.autocast(self.device):
            logits = self.model(input_ids=x, use_cache=False).logits[0, :-1]
        lp = logits.float().log_softmax(-1).cpu()  # (T - 1, V): row t - 1 predicts ids[t]
        top = lp.topk(k, dim=-1) if k else None
        out: list[dict | None] = [None]
        dec = self.tokenizer.decode
        for t in range(1, len(ids)):
            row, own = lp[t - 1], ids[t]
            picks = {own: float(row[own])}
            if top is not None:
                picks |= {int(i): float(v) for i, v in zip(top.indices[t - 1], top.values[t - 1])}
            out.append({i: (v, int((row > v).sum()) + 1, dec([i])) for i, v in picks.items()})
        return out

    def _logprobs(self, logits, token: int, k: int) -> TokenLogprobs:
        import torch

        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, k)
        dec = self.tokenizer.decode
        return TokenLogprobs(token, dec([token]), float(lp[token]),
                             [(int(j), dec([int(j)]), float(v)) for v, j in zip(top.values, top.indices)])


def pick(logits, temperature: float, top_p: float, gen) -> int:
    """Next token from one row of logits (vocab,): greedy at temperature 0, else nucleus sampling
    with the request's own generator, so a seed gives the same text whatever the batch."""
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cut = (p.cumsum(-1) - p) >= top_p
        p[cut] = 0
        return int(order[torch.multinomial(p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))
