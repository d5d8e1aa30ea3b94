"""Cross-tokenizer alignment (slmkit.align) on hard text, with two tokenizers made here: the
byte-level BPE of conftest.make_tokenizer and the SentencePiece-style one of make_chat_sp_tokenizer."""

from __future__ import annotations

import pytest
import torch

from conftest import make_chat_sp_tokenizer, make_tokenizer
from slmkit import align, losses
from slmkit.data import Example, encode

HARD = [
    "Grüße aus Köln, naïve café",                 # Latin-1 letters: 2-byte UTF-8
    "日本語のテキストと中文",                        # CJK: 3 bytes a character, none in the vocabularies
    "emoji 😀👍🏽 and a flag 🇩🇪",                   # 4-byte characters, modifiers, pairs
    "numbers 2024, 3.14159 and 1,000,000",         # digits split differently
    "spaces   runs\t\ttabs  and\n\nnewlines\n",     # whitespace runs
    "<|im_start|>user\nhi<|im_end|>\n",            # chat-template special tokens inside text
    " leading space and trailing ",
    "a",
]


@pytest.fixture(scope="module")
def toks():
    return make_tokenizer(), make_chat_sp_tokenizer()


def _spans(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, align.spans(tok, text, ids)


@pytest.mark.parametrize("text", HARD)
def test_spans_tile_the_text_in_bytes(toks, text):
    size = len(text.encode())
    for tok in toks:
        ids, sp = _spans(tok, text)
        assert len(sp) == len(ids)
        assert sp[-1][1] == size
        # monotone, contiguous, inside the text; a SentencePiece prefix space is zero-width
        assert sp[0][0] == 0
        for (a, b), (c, d) in zip(sp, sp[1:]):
            assert a <= b == c <= d
        # where the tokens spell their bytes, the spans cut exactly those bytes out of the text
        vocab = align.token_bytes(tok)
        for i, (a, b) in zip(ids, sp):
            if b - a == len(vocab[i]):
                assert text.encode()[a:b] == vocab[i]


@pytest.mark.parametrize("text", HARD)
def test_groups_close_where_both_end(toks, text):
    (_, s), (_, t) = (_spans(tok, text) for tok in toks)
    gs = align.groups(s, t)
    assert [i for g, _ in gs for i in g] == list(range(len(s)))
    assert [i for _, g in gs for i in g] == list(range(len(t)))
    for sg, tg in gs:
        assert s[sg[-1]][1] == t[tg[-1]][1]       # a group ends at a common byte
        assert s[sg[0]][0] == t[tg[0]][0]         # so the next one starts at one
        # inside a group no boundary is shared
        assert not {s[i][1] for i in sg[:-1]} & {t[j][1] for j in tg[:-1]}


def test_pairs_same_tokenizer_is_the_identity(toks):
    for tok in toks:
        for text in HARD:
            _, sp = _spans(tok, text)
            assert align.pairs(sp, sp) == list(range(len(sp)))


def test_pairs_are_tokens_starting_at_a_common_boundary():
    s = [(0, 3), (3, 5), (5, 9), (9, 10)]        # "abc|de|fghi|j"
    t = [(0, 1), (1, 3), (3, 7), (7, 9), (9, 10)]  # "a|bc|defg|hi|j"
    assert align.groups(s, t) == [(range(0, 1), range(0, 2)), (range(1, 3), range(2, 4)),
                                  (range(3, 4), range(4, 5))]
    assert align.pairs(s, t) == [0, 2, -1, 4]


def test_token_bytes_of_both_vocabulary_spellings(toks):
    bl, sp = toks
    vb, vs = align.token_bytes(bl), align.token_bytes(sp)
    assert vb[bl.convert_tokens_to_ids("Ġthe")] == b" the"
    assert vs[sp.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert vs[sp.convert_tokens_to_ids("▁the")] == b" the"
    assert vb[bl.eos_token_id] == b"<|im_end|>"


def test_vocab_map_exact_then_longest_prefix_then_eos(toks):
    bl, sp = toks
    m = align.VocabMap(sp)
    assert m.student_id(b" the") == sp.convert_tokens_to_ids("▁the")
    # a teacher token the student lacks goes to the student's longest prefix of it
    assert m.student_id(" thezzq".encode()) == sp.convert_tokens_to_ids("▁the")
    assert m.student_id("日".encode()) == sp.convert_tokens_to_ids("<0xE6>")  # the first byte
    assert m.student_id(b"") == align.NONE and m.student_id(None) == align.NONE
    table = m.table(align.token_bytes(bl), [bl.eos_token_id])
    assert table[bl.eos_token_id] == sp.eos_token_id
    assert all(t >= 0 for t in table)  # every byte-level token starts with some student byte


def test_map_rows_merges_and_drops_to_the_tail():
    table = torch.tensor([5, 5, -1, 7])
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [float("-inf")] * 4]).log_softmax(-1)
    lp[1] = float("-inf")
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    out, sid = align.map_rows(lp, ids, table)
    p = lp[0].exp()
    assert sid[0, 0] == 5 and sid[0, 3] == 7
    assert out[0, 0].exp() == pytest.approx(float(p[0] + p[1]))
    assert torch.isinf(out[0, 1]) and torch.isinf(out[0, 2])   # merged away / unmapped
    assert out[0, 3] == lp[0, 3]                                 # alone: exactly kept
    assert torch.isinf(out[1]).all()


def test_a_row_without_teacher_prediction_costs_nothing_and_grads_are_finite():
    s = torch.randn(3, 11, requires_grad=True)
    lp = torch.tensor([[-0.5, -1.5], [float("-inf"), float("-inf")], [-0.1, float("-inf")]])
    ids = torch.tensor([[1, 2], [0, 0], [4, 4]])
    for kind in losses.KINDS:
        kd = losses.sparse_kd(s, lp, ids, kind)
        assert float(kd.detach()[1]) == pytest.approx(0.0, abs=1e-6)
        kd.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_mapped_kd_identity_is_dense_kd_and_merging_is_a_coarsening():
    torch.manual_seed(0)
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    ident = losses.VocabTable(list(range(9)), 9)
    assert ident.identity
    ident.identity = False  # the general path, too, gives dense_kd for an identity map
    for kind in losses.KINDS:
        for tau in (1.0, 2.0):
            torch.testing.assert_close(losses.mapped_kd(s, t, ident, kind, 0.5, tau),
                                       losses.dense_kd(s, t, kind, 0.5, tau), rtol=1e-6, atol=1e-7)
    # teacher tokens 0 and 1 both land on student 0, 8 maps nowhere; 3 student tokens get no mass
    table = [0, 0, 1, 2, 3, 4, 5, -1, -1]
    got = losses.mapped_kd(s, t[:, :9], losses.VocabTable(table, 9), "forward_kl")
    p = t.log_softmax(-1).exp()
    pb = torch.stack([p[:, 0] + p[:, 1], *[p[:, i] for i in range(2, 7)], p[:, 7] + p[:, 8]], -1)
    q = s.log_softmax(-1).exp()
    qb = torch.cat([q[:, :6], q[:, 6:].sum(-1, keepdim=True)], -1)
    want = (pb * (pb.log() - qb.log())).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prediction_pairs_of_a_chat_example(toks):
    # each model's prompt in its own template; the answer and its EOS are what pair up
    bl, sp = toks
    ex = Example(prompt="Fix: he have 2024 cats", answer="He has 2024 cats. 😀", where="x")
    (si, sm), (ti, tm) = encode(ex, sp), encode(ex, bl)
    s_sp = align.position_spans(ex, sp, si, sm, align.token_bytes(sp))
    t_sp = align.position_spans(ex, bl, ti, tm, align.token_bytes(bl))
    got = align.prediction_pairs(s_sp, t_sp)
    assert len(got) == sum(sm[1:])
    assert got[-1] == sum(tm[1:]) - 1  # EOS after the answer pairs with the teacher's EOS
    assert got[0] == 0                 # both start the answer right after their prompt
    assert align.prediction_pairs(s_sp, s_sp) == list(range(len(got)))
    with pytest.raises(Exception, match="messages"):
        align.aligned_text(Example(messages=[{"role": "user", "content": "x"}], where="f:1"))


def test_text_spans_of_an_http_teachers_pieces():
    # leading/trailing whitespace the stored answer stripped; pieces of a character as U+FFFD
    assert align.text_spans([" Hello", " w", "orld", "\n"], "Hello world") == [
        (0, 5), (5, 7), (7, 11), (11, 11)]
    assert align.text_spans(["a", "\ufffd", "\ufffd", "b"], "aܮb") == [(0, 1), (1, 3), (3, 3), (3, 4)]
    assert align.text_spans(["x", " ", "\ufffd", "\ufffd", "\ufffd"], "x 日") == [
        (0, 1), (1, 2), (2, 5), (5, 5), (5, 5)]
    assert align.text_spans(["a", "\ufffd", "x"], "ab") is None  # they do not spell it
    # a zero-width piece without a prediction hands the group start to the next token
    s = [(0, 1), (1, 4)]
    t = [(0, 1), (1, 1), (1, 4)]
    assert align.pairs(s, t) == [0, 1]
    assert align.pairs(s, t, [True, False, True]) == [0, 2]
