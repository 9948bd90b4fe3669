import math

import numpy as np
import pytest
import torch

from rmlib.losses import (
    bct_influence_loss,
    cl_loss,
    hardest_half,
    mcl_loss,
    mean_distance_loss,
    pairwise_distances,
)
from rmlib.models import CosineClassifier


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def d(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def half(values, hardest):
    """Indices of the harder half (rounded up) of {index: distance}, by a plain sort."""
    items = sorted(values.items(), key=lambda kv: (-kv[1] if hardest == "far" else kv[1], kv[0]))
    return [k for k, _ in items[: (len(items) + 1) // 2]]


def term(anchor, items, labels, i, tau, mine, exclude_self, other_anchor=None, other=None):
    """-log(sum_pos s / (sum_pos s + sum_neg s [+ sum_other_neg s])) with explicit loops."""
    n = len(labels)
    dist = {k: d(anchor[i], items[k]) for k in range(n)}
    same = [labels[k] == labels[i] and not (exclude_self and k == i) for k in range(n)]
    pos = {k: v for k, v in dist.items() if same[k]}
    neg = {k: v for k, v in dist.items() if labels[k] != labels[i]}
    if not pos:
        return None
    p_idx = half(pos, "far") if mine else list(pos)
    n_idx = half(neg, "near") if mine else list(neg)
    s_pos = sum(math.exp(-pos[k] / tau) for k in p_idx)
    s_neg = sum(math.exp(-neg[k] / tau) for k in n_idx)
    if other is not None:
        od = {k: d(other_anchor[i], other[k]) for k in range(n) if labels[k] != labels[i]}
        o_idx = half(od, "near") if mine else list(od)
        s_neg += sum(math.exp(-od[k] / tau) for k in o_idx)
    return -math.log(s_pos / (s_pos + s_neg))


def test_pairwise_distances_and_their_gradient_at_zero():
    a = rand(5, 3, seed=1).requires_grad_()
    dist = pairwise_distances(a, a)
    torch.testing.assert_close(dist, torch.cdist(a, a), atol=1e-5, rtol=0)
    dist.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_rqt_eq9_is_the_mean_distance():
    rev, old = rand(6, 4, seed=2), rand(6, 4, seed=3)
    expected = np.mean([d(r, o) for r, o in zip(rev.tolist(), old.tolist(), strict=True)])
    assert mean_distance_loss(rev, old).item() == pytest.approx(expected)


def test_hardest_half_selects_far_positives_and_near_negatives():
    dist = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]])
    mask = torch.tensor([[True, True, True, False, True]])
    assert hardest_half(dist, mask, "far").tolist() == [[False, True, False, False, True]]
    assert hardest_half(dist, mask, "near").tolist() == [[True, False, True, False, False]]


def test_hardest_half_matches_a_full_sort_on_random_rows_with_ties():
    """The partial sort (top-k) keeps exactly what sorting each row would: ties with the
    cut-off included, rows of different sizes, empty rows."""
    g = torch.Generator().manual_seed(0)
    dist = torch.randint(0, 6, (40, 30), generator=g).double()  # many ties
    mask = torch.rand(40, 30, generator=g) < torch.linspace(0, 1, 40)[:, None]
    for hardest in ("far", "near"):
        far = hardest == "far"
        expected = torch.zeros_like(mask)
        for i in range(40):
            values = sorted(dist[i][mask[i]].tolist(), reverse=far)
            if values:
                cut = values[(len(values) + 1) // 2 - 1]
                expected[i] = mask[i] & ((dist[i] >= cut) if far else (dist[i] <= cut))
        assert torch.equal(hardest_half(dist, mask, hardest), expected)


def test_mcl_gradients_stay_finite_when_an_anchor_has_no_positive():
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2: one item, no positive but itself
    rev, new = rand(5, 3, seed=20).requires_grad_(), rand(5, 3, seed=21).requires_grad_()
    loss = mcl_loss(rev, rand(5, 3, seed=22), new, labels, tau=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rev.grad).all()
    assert torch.isfinite(new.grad).all()


@pytest.mark.parametrize("mine", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_cl_matches_a_loop(mine, tau):
    labels = [0, 0, 1, 1, 1, 2, 0, 2]
    rev, old = rand(8, 3, seed=4), rand(8, 3, seed=5)
    got = cl_loss(rev, old, torch.tensor(labels), tau=tau, mine=mine).item()
    terms = [term(rev.tolist(), old.tolist(), labels, i, tau, mine, False) for i in range(8)]
    assert got == pytest.approx(np.mean([t for t in terms if t is not None]), rel=1e-9)


@pytest.mark.parametrize("mine", [False, True])
def test_mcl_matches_a_loop(mine):
    labels = [0, 0, 1, 1, 1, 2, 0, 2, 2]
    rev, old, new = rand(9, 3, seed=6), rand(9, 3, seed=7), rand(9, 4, seed=8)
    tau = 0.5
    got = mcl_loss(rev, old, new, torch.tensor(labels), tau=tau, mine=mine).item()
    r, o, n = rev.tolist(), old.tolist(), new.tolist()
    back = [term(r, o, labels, i, tau, mine, False, n, n) for i in range(9)]
    fwd = [term(n, n, labels, i, tau, mine, True, r, o) for i in range(9)]
    expected = np.mean([t for t in back if t is not None]) + np.mean(
        [t for t in fwd if t is not None])
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mine", [False, True])
def test_gradients_of_cl_and_mcl(mine):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    rev = rand(6, 3, seed=12).requires_grad_()
    old = rand(6, 3, seed=13)
    new = rand(6, 3, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda r: cl_loss(r, old, labels, 0.7, mine), (rev,))
    assert torch.autograd.gradcheck(
        lambda r, n: mcl_loss(r, old, n, labels, 0.7, mine), (rev, new))


def test_rho_form_has_finite_gradients_through_a_zero_diagonal():
    labels = torch.tensor([0, 0, 1, 1])
    new = rand(4, 3, seed=15).requires_grad_()
    loss = mcl_loss(new[:, :3] * 0.5, rand(4, 3, seed=16), new, labels, tau=0.1)
    loss.backward()
    assert torch.isfinite(new.grad).all()


def test_bct_influence_uses_old_classes_only():
    clf = CosineClassifier(4, 3).double()
    emb = rand(5, 4, seed=17)
    labels = torch.tensor([0, 2, 5, 1, 7])
    got = bct_influence_loss(emb, labels, clf, num_old_classes=3)
    keep = labels < 3
    expected = torch.nn.functional.cross_entropy(clf(emb[keep]), labels[keep])
    assert got.item() == pytest.approx(expected.item())
    assert bct_influence_loss(emb, labels + 10, clf, 3).item() == 0.0


def test_fct_regression_is_the_same_mean_distance():
    a, b = rand(3, 4, seed=18), rand(3, 4, seed=19)
    assert mean_distance_loss(a, b).item() == pytest.approx((a - b).norm(dim=1).mean().item())
