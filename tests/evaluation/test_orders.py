"""Backfill order policies: the benefit they rank by, and that ranking by it pays."""

import numpy as np
import pytest

from rmlib import RmlibError
from rmlib.evaluation.backfill import simulate_backfill
from rmlib.evaluation.orders import (
    fit_benefit_head,
    item_benefit,
    order_by_priority,
    policy_order,
    predicted_benefit,
)
from rmlib.evaluation.systems import SystemPair


def two_systems(n=60, dim=6, classes=6, seed=0, noisy_share=0.5):
    """Old embeddings with class structure but half the items badly placed; the new model
    places every item well: re-embedding a badly placed item helps most."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim)) * 3
    new = centres[labels] + 0.3 * rng.normal(size=(n, dim))
    old = centres[labels] + 0.3 * rng.normal(size=(n, dim))
    noisy = rng.random(n) < noisy_share
    old[noisy] += 3 * rng.normal(size=(noisy.sum(), dim))
    arrays = SystemPair(old.astype(np.float32), old.astype(np.float32),
                            new.astype(np.float32), new.astype(np.float32), labels)
    return arrays, noisy


def direct_benefit(a: SystemPair, k: int) -> np.ndarray:
    """item_benefit by loops over numpy float64 distances (leave-one-out)."""
    def dist(q, g):
        return np.linalg.norm(q[:, None, :].astype(np.float64) - g[None].astype(np.float64),
                              axis=2)
    d_old, d_new = dist(a.old_query, a.old_gallery), dist(a.new_query, a.new_gallery)
    labels, n = a.query_labels, len(a.query_labels)
    out = np.zeros(n)
    for g in range(n):
        others = np.arange(n) != g
        rel = others & (labels == labels[g])
        irr = np.flatnonzero(labels != labels[g])
        near = irr[np.argsort(np.minimum(d_old[irr, g], d_new[irr, g]), kind="stable")[:k]]
        helped = (d_old[rel, g] - d_new[rel, g]).mean() if rel.any() else 0.0
        out[g] = helped - (d_old[near, g] - d_new[near, g]).mean()
    return out


def test_benefit_matches_a_direct_computation_for_any_chunk():
    arrays, _ = two_systems(n=45)
    want = direct_benefit(arrays, k=5)
    for chunk in (7, 45, 1000):
        got = item_benefit(arrays, nearest_irrelevant=5, chunk=chunk)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_badly_placed_old_items_have_the_largest_benefit():
    arrays, noisy = two_systems()
    benefit = item_benefit(arrays)
    assert benefit[noisy].mean() > benefit[~noisy].mean() + 1.0


def test_the_oracle_order_beats_random_and_the_orders_are_permutations():
    arrays, _ = two_systems(n=120, seed=1)
    protocol = arrays.protocol()
    aucs = {}
    for policy in ("random", "oracle"):
        order = policy_order(policy, arrays, seed=0)
        assert sorted(order.tolist()) == list(range(120))
        curve = simulate_backfill(arrays.old_query, arrays.old_gallery, arrays.new_query,
                                  arrays.new_gallery, protocol, order=order)
        aucs[policy] = curve.auc("mAP")
    assert aucs["oracle"] > aucs["random"] + 0.01


def test_the_head_learns_the_benefit_from_old_embeddings_of_unseen_items():
    train, noisy_train = two_systems(n=300, seed=2)
    test, noisy_test = two_systems(n=120, seed=3)
    head = fit_benefit_head(train.old_gallery, item_benefit(train), seed=0)
    predicted = predicted_benefit(head, test.old_gallery)
    # badly placed old embeddings are far from every class centre: the head sees that
    assert predicted[noisy_test].mean() > predicted[~noisy_test].mean()
    order = policy_order("uncertainty", test, seed=0, train=train)
    first_half = order[: len(order) // 2]
    assert noisy_test[first_half].mean() > noisy_test.mean()


def test_priority_orders_ties_by_index_and_refuses_nan():
    assert order_by_priority(np.array([1.0, 3.0, 1.0, 3.0])).tolist() == [1, 3, 0, 2]
    with pytest.raises(RmlibError, match="finite"):
        order_by_priority(np.array([1.0, np.nan]))
    with pytest.raises(RmlibError, match="unknown backfill order"):
        policy_order("fastest", two_systems(n=12)[0])
    with pytest.raises(RmlibError, match="training items"):
        policy_order("uncertainty", two_systems(n=12)[0])
