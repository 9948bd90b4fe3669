"""The arithmetic of eq. 9-11 on examples small enough to check by hand.

These are the pieces the RQT and MCL chapters show: `mean_distance_loss` (eq. 9),
`log_similarity_sum` and `contrastive_terms` (the sums and ratios of eq. 10-11), and the two
properties the chapters teach: CL (eq. 10) cannot see a constant offset between one system's
distances and another's, MCL (eq. 11) can, and is smallest when the two systems agree.
"""

import math

import pytest
import torch

from rmlib.losses import (
    cl_loss,
    contrastive_terms,
    log_similarity_sum,
    mcl_loss,
    mean_distance_loss,
    mined_pairs,
    pairwise_distances,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_rqt_eq9_on_three_right_triangles():
    old = t([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])
    rev = old + t([[0.3, 0.4], [0.6, -0.8], [0.5, 1.2]])  # distances 0.5, 1.0, 1.3
    assert mean_distance_loss(rev, old).item() == pytest.approx(2.8 / 3)
    oracle = torch.linalg.vector_norm(rev - old, dim=1).mean()
    assert mean_distance_loss(rev, old).item() == pytest.approx(oracle.item())


def test_rqt_gradient_is_finite_where_the_query_already_sits_on_its_target():
    old = t([[1.0, 0.0], [0.0, 1.0]])
    rev = old.clone().requires_grad_()
    mean_distance_loss(rev, old).backward()
    assert torch.isfinite(rev.grad).all()


def test_log_similarity_sum_is_the_log_of_the_masked_sum_of_similarities():
    dist = t([[0.5, 1.0, 2.0], [0.0, 3.0, 1.5]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    tau = 0.5
    got = log_similarity_sum(dist, mask, tau)
    assert got[0].item() == pytest.approx(math.log(math.exp(-1.0) + math.exp(-4.0)))
    assert got[1].item() == float("-inf")  # nothing to sum: log 0
    plain = torch.log((torch.exp(-dist / tau) * mask).sum(1))
    torch.testing.assert_close(got, plain)


def test_log_similarity_sum_does_not_underflow_where_the_plain_sum_does():
    dist = t([[10.0, 10.0, 12.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    tau = 0.01  # exp(-1000) is 0 in float64
    assert torch.log(torch.exp(-dist / tau).sum(1)).item() == float("-inf")
    got = log_similarity_sum(dist, mask, tau).item()
    assert got == pytest.approx(-1000.0 + math.log(2.0 + math.exp(-200.0)))


def test_contrastive_terms_by_hand_with_and_without_the_other_systems_negatives():
    dist = t([[0.2, 0.7, 0.9], [0.4, 0.1, 0.3]])
    pos = torch.tensor([[True, False, False], [False, True, False]])
    neg = ~pos
    other = t([[5.0, 0.6, 0.8], [0.5, 5.0, 0.2]])
    s = [[math.exp(-d) for d in row] for row in dist.tolist()]
    o = [[math.exp(-d) for d in row] for row in other.tolist()]
    cl = [-math.log(s[0][0] / sum(s[0])), -math.log(s[1][1] / sum(s[1]))]
    mcl = [-math.log(s[0][0] / (sum(s[0]) + o[0][1] + o[0][2])),
           -math.log(s[1][1] / (sum(s[1]) + o[1][0] + o[1][2]))]
    torch.testing.assert_close(contrastive_terms(dist, pos, neg, 1.0), t(cl))
    torch.testing.assert_close(contrastive_terms(dist, pos, neg, 1.0, (other, neg)), t(mcl))


def test_contrastive_terms_skip_anchors_without_a_positive():
    dist = t([[0.2, 0.7], [0.4, 0.1]])
    pos = torch.tensor([[True, False], [False, False]])
    assert contrastive_terms(dist, pos, ~pos, 1.0).shape == (1,)


def both_terms(d_a, d_b, pos, neg, tau=1.0):
    """CL of system a alone, and MCL of systems a and b, from distances and shared masks."""
    cl = contrastive_terms(d_a, pos, neg, tau).mean()
    mcl = (contrastive_terms(d_a, pos, neg, tau, (d_b, neg)).mean()
           + contrastive_terms(d_b, pos, neg, tau, (d_a, neg)).mean())
    return cl.item(), mcl.item()


def test_cl_cannot_see_a_constant_offset_between_systems_mcl_can():
    """Adding delta to every distance of one system multiplies all its similarities by
    exp(-delta / tau): the factor cancels in eq. 10's ratio, not in eq. 11's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    d_new = pairwise_distances(x, x)
    pos, neg = mined_pairs(d_new, labels, mine=True, exclude_self=True)
    deltas = [-0.6, -0.3, -0.1, 0.0, 0.1, 0.3, 0.6]
    results = [both_terms(d_new + delta, d_new, pos, neg, tau=0.5) for delta in deltas]
    cls, mcls = zip(*results, strict=True)
    assert max(cls) - min(cls) < 1e-12
    assert min(mcls) == mcls[deltas.index(0.0)]  # smallest where the systems agree
    assert all(m > mcls[deltas.index(0.0)] + 1e-6 for d, m in zip(deltas, mcls, strict=True)
               if d != 0.0)


def test_the_mcl_chapters_toy():
    """The chapter's two cases: the backward system's mined distances are the new system's
    (A) or the new system's plus 1.05 (B). CL is the same; MCL is higher in B."""
    labels = torch.tensor([0, 0, 1, 1])
    new = t([[0.0, 0.0], [0.0, 0.25], [0.45, 0.0], [0.45, 0.25]])
    turn = t([[0.0, -1.0], [1.0, 0.0]])
    flat = torch.nn.functional.pad(new @ turn.T, (0, 1))
    lift = t([0.0, 0.0, 1.2])
    a = cl_loss(flat, flat, labels).item(), mcl_loss(flat, flat, new, labels).item()
    b = (cl_loss(2 * flat + lift, 2 * flat, labels).item(),
         mcl_loss(2 * flat + lift, 2 * flat, new, labels).item())
    d_b = pairwise_distances(2 * flat + lift, 2 * flat)
    assert d_b[0, 1].item() == pytest.approx(1.3) and d_b[0, 2].item() == pytest.approx(1.5)
    assert a[0] == pytest.approx(math.log(1 + math.exp(-0.2)))
    assert b[0] == pytest.approx(a[0])
    assert a[1] == pytest.approx(2 * math.log(1 + 2 * math.exp(-0.2)))
    assert b[1] == pytest.approx(math.log(1 + math.exp(-0.2) + math.exp(0.85))
                                 + math.log(1 + math.exp(-0.2) + math.exp(-1.25)))
    assert b[1] > a[1]
