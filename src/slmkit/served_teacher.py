"""A teacher behind an OpenAI-compatible server during distillation:

    slm serve teacher/ --port 8000 &                # or vLLM on another machine
    slm distill --student pruned/ --teacher openai:teacher@http://127.0.0.1:8000 --data D --out S

For every training sequence the server returns its top-k log-probs at every position (vLLM's
`prompt_logprobs` on /v1/completions, which `slm serve` answers too), and the student learns
from the counted positions with the same tail-bucket loss as from an offline cache
(slmkit.losses): the student's device never holds the teacher. Requests run `concurrency` at a
time with the retries of slmkit.backends.openai. Rows are streamed: a training batch's rows are
asked for when it trains and dropped after; only the held-out sequences' rows (`keep`, at most
--eval-max of them) stay, as every evaluation reads them again.

The server must serve the student's tokenizer: the rows are by token id. A teacher of another
family writes its data with its completion top-k instead (`slm generate --topk-logprobs`,
recipes/api-teacher.yaml), which the text path aligns (slmkit.align).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from slmkit.errors import UsageError


def is_served(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith("openai:")


class ServedTeacher:
    def __init__(self, spec: str, tokenizer, k: int = 32, concurrency: int = 8,
                 vocab_size: int | None = None):
        from slmkit.backends.openai import OpenAIBackend

        self.backend = OpenAIBackend.from_spec(spec, concurrency=concurrency)
        self.url = self.backend.base_url + "/completions"
        self.tokenizer, self.k = tokenizer, k
        self.vocab_size = vocab_size or len(tokenizer)  # the student's logits
        self.rows: dict[tuple[int, ...], tuple] = {}  # sequence -> its (T - 1, k) log-probs, ids
        self.keep: set[tuple[int, ...]] = set()  # sequences whose rows stay (the held-out ones)
        self.checked = False  # the server's tokenizer, compared once

    def prepare(self, items, examples, tokenizer, held: bool) -> None:
        if held:
            self.keep |= {tuple(e.ids) for e in items}

    def inputs(self, run, items, batch):
        """slmkit.teacher's interface: the rows of `items` as losses.loss_sums takes them."""
        from slmkit.teacher import KDInputs

        return KDInputs({"teacher_topk": self.topk(items, run.device)})

    def fetch(self, sequences) -> list[tuple]:
        """The rows of each sequence of token ids ((T - 1, k) log-probs, (T - 1, k) ids; row
        t - 1 predicts token t), asked for `concurrency` at a time; only the `keep` ones stay."""
        todo = list({tuple(s) for s in sequences} - set(self.rows))
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.backend.concurrency, len(todo))) as pool:
                for ids, rows in zip(todo, pool.map(self._ask, todo)):
                    self.rows[ids] = rows
        out = [self.rows[tuple(s)] for s in sequences]
        for key in [key for key in self.rows if key not in self.keep]:
            del self.rows[key]
        return out

    def topk(self, items, device):
        """Like topk_cache.v1_rows: the top-k rows of every counted position of `items` (and
        of each example of a packed row), in batch order: ((M, k) float32, (M, k) long)."""
        import torch

        examples = [part for item in items for part in item.segments]
        lps, idss = [], []
        for e, (lp, ids) in zip(examples, self.fetch([e.ids for e in examples])):
            counted = torch.tensor(e.mask[1:], dtype=torch.bool)  # row t - 1 predicts token t
            lps.append(lp[counted])
            idss.append(ids[counted])
        return torch.cat(lps).to(device), torch.cat(idss).to(device)

    def _ask(self, ids: tuple[int, ...]):
        from slmkit.backends.openai import _BadRequest

        body = {"model": self.backend.name, "prompt": list(ids), "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": self.k}
        try:
            reply = self.backend._post("/completions", body, None)
        except _BadRequest as e:
            raise UsageError(f"teacher {self.url} refused to score a sequence ({e}); it must "
                             "support vLLM's prompt_logprobs (vLLM, slm serve) and read the "
                             "token ids of the local tokenizer (a teacher of another tokenizer: "
                             "name it with --teacher-tokenizer MODEL)") from None
        return self.parse(reply, ids)

    def parse(self, reply: dict, ids) -> tuple:
        """(log-probs (T - 1, k) float32, ids (T - 1, k) long) from a /v1/completions reply with
        `prompt_logprobs`: position t holds {token id: {"logprob", "rank", "decoded_token"}}."""
        import torch

        try:
            scored = reply["choices"][0].get("prompt_logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            scored = None
        if not scored:
            raise UsageError(f"teacher {self.url} returned no prompt log-probs; it must support "
                             "vLLM's prompt_logprobs (vLLM, slm serve)")
        if len(scored) != len(ids):
            raise UsageError(f"teacher {self.url} scored {len(scored)} positions of a "
                             f"{len(ids)}-token sequence; it must score every prompt token")
        lp = torch.empty((len(ids) - 1, self.k))
        top = torch.empty((len(ids) - 1, self.k), dtype=torch.long)
        for t in range(1, len(ids)):
            entries = sorted(((float(v["logprob"]), int(i)) for i, v in scored[t].items()), reverse=True)
            if len(entries) < self.k:
                raise UsageError(f"teacher {self.url} returned {len(entries)} log-probs at a "
                                 f"position, fewer than --top-k {self.k}")
            if not self.checked:
                self._check_tokenizer(scored[t].get(str(ids[t])), ids[t])
            beyond = [i for _, i in entries[:self.k] if not 0 <= i < self.vocab_size]
            if beyond:
                raise UsageError(f"teacher {self.url} returned token id {beyond[0]}, outside the "
                                 f"vocabulary of {self.vocab_size}: it serves another tokenizer. "
                                 "Name it with --teacher-tokenizer MODEL (the text path aligns "
                                 "the two), or have it write the data with its top-k (`slm generate "
                                 "--topk-logprobs 20`, recipes/api-teacher.yaml)")
            lp[t - 1] = torch.tensor([v for v, _ in entries[:self.k]])
            top[t - 1] = torch.tensor([i for _, i in entries[:self.k]])
        self.checked = True
        return lp, top

    def _check_tokenizer(self, own: dict | None, token: int) -> None:
        """The server reports each prompt token with its text: it must be ours for that id."""
        text = (own or {}).get("decoded_token")
        if text is not None and text != self.tokenizer.decode([token]):
            raise UsageError(f"teacher {self.url} reads token {token} as {text!r}, the local "
                             f"tokenizer as {self.tokenizer.decode([token])!r}: it serves another "
                             "tokenizer; name it with --teacher-tokenizer MODEL (a local model with "
                             "the served model's tokenizer)")
