"""The shared log-likelihood scorer (slmkit.scoring): every scorer batched, with rows of mixed
lengths in one batch, equals the same computation one sequence at a time, on both precision
paths; batches follow the token budget; `--batch-size auto` reads free memory and backs off
after an out-of-memory error."""

import math

import pytest
import torch

from conftest import REL_TOL
from slmkit import evaluate as E
from slmkit import models, precision, safety, scoring
from slmkit.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "phi"])
def tiny(request, tmp_path_factory):
    """Llama (RoPE, GQA) and Phi (partial rotary, LayerNorm, parallel block)."""
    from conftest import make_tiny_model

    folder = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "m")
    return models.load_model(folder)


def _alone(model, ids: list[int], start: int) -> float:
    """Summed log p(ids[start:]) from one unpadded sequence: the unbatched reference."""
    with torch.no_grad(), precision.autocast("cpu"):
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def _close(got, want, mode):
    assert got == pytest.approx(want, rel=REL_TOL[mode], abs=1e-4 if mode == "off" else 2e-2)


GROUPS = [  # contexts of 1, 3 and 9 tokens; choices of 1 to 5 tokens, 2 to 4 per question
    ([5], [[17], [40, 41, 42, 43, 44], [9, 9]]),
    ([100, 3, 77], [[8, 9], [10]]),
    ([11, 12, 13, 14, 15, 16, 17, 18, 19], [[200, 201, 202], [7], [30, 31, 32, 33], [150]]),
]


@pytest.mark.parametrize("shared", scoring.SHARED)
def test_continuations_batched_equal_alone(tiny, shared, autocast_mode):
    model, _ = tiny
    got = scoring.score_continuations(model, GROUPS, batch_size=len(GROUPS), shared=shared)
    for (ctx, conts), scores in zip(GROUPS, got):
        assert len(scores) == len(conts)
        for c, s in zip(conts, scores):
            _close(s, _alone(model, ctx + c, len(ctx)), autocast_mode)
    # one row at a time gives the same numbers: batching changes nothing but speed
    single = scoring.score_continuations(model, GROUPS, batch_size=1, shared=shared)
    for a, b in zip(got, single):
        for x, y in zip(a, b):
            _close(x, y, autocast_mode)


def test_spans_batched_equal_alone(tiny, autocast_mode):
    model, _ = tiny
    spans = [([3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 1), ([50, 60], 1), ([70, 71, 72, 73, 74], 3)]
    for bs in (len(spans), scoring.AUTO):
        for (ids, start), s in zip(spans, scoring.score_spans(model, spans, batch_size=bs)):
            _close(s, _alone(model, ids, start), autocast_mode)


def test_loglikelihoods_share_contexts_and_equal_lm_eval_formula(tiny, autocast_mode):
    model, tok = tiny
    pairs = [("Question: what does the fox do?\nAnswer:", c) for c in (" jumps", " sleeps in the sun", " ?")]
    pairs += [("Thanks for your message! ", x) for x in ("I will call", "Yes")]  # trailing space moves
    pairs += [("Can you send me the report", " before the meeting tomorrow morning?")]
    got = {shared: E.loglikelihoods(model, tok, pairs, batch_size=4, shared=shared) for shared in scoring.SHARED}
    for k, (c, x) in enumerate(pairs):
        n = len(c) - len(c.rstrip(" "))
        c, x = (c[:-n], c[-n:] + x) if n else (c, x)
        ctx = tok(c, add_special_tokens=False)["input_ids"]
        cont = tok(c + x, add_special_tokens=False)["input_ids"][len(ctx):]
        want = _alone(model, ctx + cont, len(ctx))
        for shared in scoring.SHARED:
            _close(got[shared][k], want, autocast_mode)


def test_sentence_perplexities_batched_equal_alone(tiny, autocast_mode):
    model, tok = tiny
    texts = ["Hi there.", "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
             "Can you send me the report?", "Thanks!"]
    lengths = {len(tok(t)["input_ids"]) for t in texts}
    assert len(lengths) >= 3  # rows of different lengths share the batch
    batched = safety.sentence_perplexities(model, tok, texts, batch_size=len(texts))
    alone = [safety.sentence_perplexities(model, tok, [t], batch_size=1)[0] for t in texts]
    for t, b, a in zip(texts, batched, alone):
        ids = tok(t)["input_ids"]
        direct = math.exp(-_alone(model, ids, 1) / (len(ids) - 1))
        assert b == pytest.approx(direct, rel=max(1e-4, REL_TOL[autocast_mode]))
        assert b == pytest.approx(a, rel=max(1e-4, REL_TOL[autocast_mode]))


def test_perplexity_windows_batched_equal_alone(tiny, autocast_mode):
    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 2
    # 16-token windows every 6 tokens: full windows and a shorter last one in the same batch
    batched = E.perplexity(model, tok, text, max_length=16, stride=6, batch_size=8)
    alone = E.perplexity(model, tok, text, max_length=16, stride=6, batch_size=1)
    assert batched == pytest.approx(alone, rel=max(1e-4, REL_TOL[autocast_mode]))
    ids = tok(text)["input_ids"]
    nll, count, prev = 0.0, 0, 0
    for begin in range(0, len(ids), 6):  # the same windows, one by one, by hand
        end = min(begin + 16, len(ids))
        start = max(1, prev - begin)
        nll -= _alone(model, ids[begin:end], start)
        count += end - begin - start
        prev = end
        if end == len(ids):
            break
    assert batched == pytest.approx(math.exp(nll / count), rel=max(1e-4, REL_TOL[autocast_mode]))


def test_next_batch_follows_rows_and_tokens():
    lengths = [10, 40, 20, 20, 5]
    order = sorted(range(5), key=lambda i: -lengths[i])  # 40, 20, 20, 10, 5
    assert scoring.next_batch(lengths, order, 0, max_rows=8, max_tokens=80) == 2  # 2 x 40 = 80
    assert scoring.next_batch(lengths, order, 1, max_rows=8, max_tokens=80) == 5  # 4 x 20 = 80
    assert scoring.next_batch(lengths, order, 1, max_rows=2, max_tokens=10**9) == 3
    assert scoring.next_batch(lengths, order, 0, max_rows=8, max_tokens=1) == 1  # never empty


def test_token_budget_reads_free_memory(tiny, monkeypatch):
    model, _ = tiny
    per = scoring.bytes_per_token(model.config)
    monkeypatch.setattr(scoring, "free_memory", lambda device: 2000 * per)
    assert scoring.token_budget(model) == 1000  # half of free memory on a CPU
    monkeypatch.setattr(scoring, "free_memory", lambda device: 10**15)
    assert scoring.token_budget(model) == scoring.CPU_MAX_TOKENS
    assert scoring.free_memory("cpu") > 0


def test_auto_backs_off_after_out_of_memory(tiny, monkeypatch):
    model, _ = tiny
    spans = [([3, 4, 5, 6, 7, 8], 1)] * 6
    want = scoring.score_spans(model, spans, batch_size=1)
    monkeypatch.setattr(scoring, "token_budget", lambda model: 10**6)
    decoder = model.get_decoder()  # the scorer runs the decoder, then the head on scored positions
    real, sizes = decoder.forward, []

    def forward(*a, **kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*a, **kw)

    monkeypatch.setattr(decoder, "forward", forward)
    got = scoring.score_spans(model, spans, batch_size=scoring.AUTO)
    # 6 rows x 5 tokens fail, half the tokens (3 rows) fail, then one row at a time
    assert sizes == [6, 3, 1, 1, 1, 1, 1, 1] and got == pytest.approx(want, rel=1e-5)


def test_batch_size_argument(cli, tmp_path):
    assert scoring.parse_batch_size("auto") == "auto" and scoring.parse_batch_size("8") == 8
    for bad in ("0", "many", "-3"):
        with pytest.raises(UsageError, match="--batch-size"):
            scoring.parse_batch_size(bad)
    code, _, err = cli("eval", "nowhere", "--ppl", "x.txt", "--batch-size", "0")
    assert code == 2 and "--batch-size 0" in err and len(err.strip().splitlines()) == 1


def test_without_a_separable_head_logits_come_whole(tiny, monkeypatch):
    # a model whose logits are changed after the head (soft-capping) is scored from its logits
    model, _ = tiny
    spans = [([3, 4, 5, 6, 7, 8, 9], 2), ([50, 60, 70], 1)]
    split = scoring.score_spans(model, spans, batch_size=2)
    assert scoring._head(model) is model.get_output_embeddings()
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert scoring._head(model) is None
    whole = scoring.score_spans(model, spans, batch_size=2)  # the model ignores the setting
    assert whole == pytest.approx(split, rel=1e-5)
    assert whole == pytest.approx([_alone(model, ids, s) for ids, s in spans], rel=1e-5)
