"""Each loss against a slow reference (torch.distributions or explicit loops) on random tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from slmkit import losses

N, V, K = 7, 50, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(seed, n=N, v=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def test_forward_and_reverse_kl_match_torch_distributions():
    s, t = _logits(0), _logits(1)
    ref_fwd = kl_divergence(Categorical(logits=t), Categorical(logits=s))
    ref_rev = kl_divergence(Categorical(logits=s), Categorical(logits=t))
    torch.testing.assert_close(losses.dense_kd(s, t, "forward_kl").double(), ref_fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.dense_kd(s, t, "reverse_kl").double(), ref_rev, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref_fwd, ref_rev)  # the two directions really differ here


def test_temperature_scales_logits_and_multiplies_by_tau_squared():
    s, t = _logits(2), _logits(3)
    tau = 2.5
    ref = kl_divergence(Categorical(logits=t / tau), Categorical(logits=s / tau)) * tau ** 2
    torch.testing.assert_close(losses.dense_kd(s, t, "forward_kl", temperature=tau).double(), ref,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_explicit_formula(beta):
    s, t = _logits(4), _logits(5)
    got = losses.dense_kd(s, t, "jsd", beta=beta).double()
    for i in range(N):  # explicit loops over positions and vocabulary, float64
        p, q = t[i].softmax(-1), s[i].softmax(-1)
        m = beta * p + (1 - beta) * q
        ref = sum(float(beta * p[v] * math.log(p[v] / m[v]) + (1 - beta) * q[v] * math.log(q[v] / m[v]))
                  for v in range(V))
        assert got[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_jsd_endpoints_are_the_two_kls():
    s, t = _logits(6), _logits(7)
    torch.testing.assert_close(losses.dense_kd(s, t, "jsd", beta=0.0), losses.dense_kd(s, t, "forward_kl"))
    torch.testing.assert_close(losses.dense_kd(s, t, "jsd", beta=1.0), losses.dense_kd(s, t, "reverse_kl"))
    # interior JSD is bounded by log 2 (mixture divergences) while the KLs here are larger
    mid = losses.dense_kd(s, t, "jsd", beta=0.5)
    assert (mid <= math.log(2) + 1e-6).all() and (losses.dense_kd(s, t) > mid).all()


def test_sparse_tail_bucket_matches_explicit_coarsening():
    s, t = _logits(8), _logits(9)
    logp_full = t.log_softmax(-1)
    top_lp, top_ids = logp_full.topk(K, dim=-1)
    got = losses.sparse_kd(s, top_lp.half(), top_ids.int(), "forward_kl").double()
    q_full = s.softmax(-1)
    for i in range(N):
        ids = top_ids[i].tolist()
        p = [logp_full[i, v].exp().item() for v in ids]
        q = [q_full[i, v].item() for v in ids]
        p.append(1 - sum(p))
        q.append(1 - sum(q))
        ref = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        # float16 storage of the teacher's log-probs costs ~1e-3 relative
        assert got[i].item() == pytest.approx(ref, rel=5e-3, abs=1e-4)
        # coarsening never increases the divergence
        assert got[i].item() <= losses.dense_kd(s[i:i + 1], t[i:i + 1]).item() + 1e-3


def test_sparse_equals_dense_when_teacher_has_no_tail():
    s = _logits(10)
    t = torch.full((N, V), -1e4, dtype=torch.float64)
    t[:, :K] = _logits(11, v=K)  # teacher mass entirely on K tokens
    top_lp, top_ids = t.log_softmax(-1).topk(K, dim=-1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        dense = losses.dense_kd(s, t, kind)
        sparse = losses.sparse_kd(s, top_lp, top_ids, kind)
        if kind != "reverse_kl":  # exact when the tail is empty (tail terms linear in q's mass)
            torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
        else:  # the full reverse KL is huge there; the floored bucket stays finite
            assert torch.isfinite(sparse).all() and (sparse < dense).all()


def test_sparse_student_tail_is_exact_when_top_k_hold_nearly_all_mass():
    # the student's tail mass ~1.4e-7: `1 - sum(top-k probs)` in float32 cancels to noise of the
    # same size (or 0, clamped to 1e-8); the logsumexp over the other tokens keeps it exact
    s = torch.zeros(1, V, dtype=torch.float64)
    s[0, :K] = 18.0
    tail = (V - K) * math.exp(-18.0)
    want = math.log(tail / (K + tail))
    top_ids = torch.arange(K)[None]
    _, logq = losses.tail_buckets(torch.full((1, K), math.log(0.2)), top_ids,
                                  s.float().log_softmax(-1))
    assert logq[0, -1].item() == pytest.approx(want, rel=1e-4)


def test_ce_matches_negative_log_prob():
    s = _logits(12)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    ref = torch.stack([-s[i].log_softmax(-1)[labels[i]] for i in range(N)])
    torch.testing.assert_close(losses.token_ce(s, labels).double(), ref, rtol=1e-5, atol=1e-6)


def test_loss_sums_masks_and_chunks_and_gradients_match_unchunked():
    B, T = 3, 6
    g = torch.Generator().manual_seed(1)
    s = torch.randn(B, T, V, generator=g, requires_grad=True)
    t = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:] = True
    mask[2, 1:5] = True  # row 1: all padding / prompt
    kd, ce, n = losses.loss_sums(s, labels, mask, teacher_logits=t, chunk=2)
    assert n == 7
    ref_kd = sum(kl_divergence(Categorical(logits=t[b, i]), Categorical(logits=s[b, i]))
                 for b, i in mask.nonzero().tolist())
    ref_ce = sum(-s[b, i].log_softmax(-1)[labels[b, i]] for b, i in mask.nonzero().tolist())
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(kd + ce, s)
    (ref_grad,) = torch.autograd.grad(ref_kd + ref_ce, s)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad[1].abs().sum() == 0  # masked rows get no gradient


def test_loss_sums_sparse_uses_row_major_order():
    B, T = 2, 4
    s = torch.randn(B, T, V, dtype=torch.float64)
    t = torch.randn(B, T, V, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    labels = torch.zeros(B, T, dtype=torch.long)
    pos = mask.nonzero().tolist()
    lp = torch.stack([t[b, i].log_softmax(-1) for b, i in pos])
    top_lp, top_ids = lp.topk(V, dim=-1)  # k = V: no tail, so sparse == dense
    kd_sparse, _, _ = losses.loss_sums(s, labels, mask, teacher_topk=(top_lp, top_ids), chunk=3)
    kd_dense, _, _ = losses.loss_sums(s, labels, mask, teacher_logits=t)
    torch.testing.assert_close(kd_sparse, kd_dense, rtol=1e-5, atol=1e-6)


def test_mix_weights():
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert losses.mix(kd, ce, 0.0).item() == 2.0
    assert losses.mix(kd, ce, 1.0).item() == 4.0
    assert losses.mix(kd, ce, 0.25).item() == pytest.approx(2.5)


def test_distill_accepts_exactly_the_divergences_losses_computes():
    from slmkit.distill import LOSSES

    assert LOSSES == losses.KINDS  # two copies (one torch-free for --help) that must not drift
    logp = torch.log_softmax(torch.randn(3, 5), -1)
    for kind in LOSSES:
        assert losses.divergence(logp, logp, kind).abs().max() < 1e-6
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        losses.divergence(logp, logp, "kl")


def test_loss_sums_weights_each_position():
    """weights scale each masked position's KD and CE; all ones is the plain sum."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]])
    w = torch.rand(2, 5, generator=g) * mask
    kd, ce, n = losses.loss_sums(s, labels, mask, teacher_logits=t, chunk=2, weights=w)
    rows, cols = mask.bool().nonzero(as_tuple=True)
    per_kd = losses.dense_kd(s[rows, cols], t[rows, cols])
    per_ce = losses.token_ce(s[rows, cols], labels[rows, cols])
    assert n == 7
    assert float(kd) == pytest.approx(float((per_kd * w[rows, cols]).sum()), rel=1e-5)
    assert float(ce) == pytest.approx(float((per_ce * w[rows, cols]).sum()), rel=1e-5)
    ones = losses.loss_sums(s, labels, mask, teacher_logits=t, weights=torch.ones(2, 5))
    plain = losses.loss_sums(s, labels, mask, teacher_logits=t)
    assert float(ones[0]) == pytest.approx(float(plain[0]), rel=1e-6)
    assert float(ones[1]) == pytest.approx(float(plain[1]), rel=1e-6)


def test_hidden_distance_is_one_minus_cosine_over_counted_positions():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    # the same states at any positive scale: distance 0 (cosine ignores the residual's scale)
    assert float(losses.hidden_distance([s], [3 * s], mask)) == pytest.approx(0, abs=1e-5)
    # opposite directions: 2 per position; orthogonal: 1 per position
    assert float(losses.hidden_distance([s], [-s], mask)) == pytest.approx(2 * 4, rel=1e-5)
    e0, e1 = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    e0[..., 0], e1[..., 1] = 1, 1
    assert float(losses.hidden_distance([e0], [e1], mask)) == pytest.approx(4, rel=1e-6)
    # the mean over layer pairs, and masked positions never count
    t = torch.randn(2, 3, 8)
    one = float(losses.hidden_distance([s], [t], mask))
    assert float(losses.hidden_distance([s, s], [t, s], mask)) == pytest.approx(one / 2, rel=1e-5)
    t2 = t.clone()
    t2[0, 2] = torch.randn(8)
    assert float(losses.hidden_distance([s], [t2], mask)) == pytest.approx(one, rel=1e-6)
    with pytest.raises(ValueError):
        losses.hidden_distance([s], [t, t], mask)
