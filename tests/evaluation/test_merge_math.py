"""The small functions the book shows beside the paper's equations (eq. 3-5): the backfilled
part G_t^new, the merged ranking, and the histogram counts behind the 21-point evaluator."""

import numpy as np
import pytest
import torch

from rmlib.evaluation.backfill import (
    T_GRID,
    _merged_ranks,
    backfill_order,
    backfilled_count,
    backfilled_mask,
    counts_below,
    item_segments,
    merged_ranking,
    simulate_backfill,
)
from rmlib.evaluation.retrieval import (
    NO_RANK,
    Protocol,
    euclidean_distances,
    rank_keys,
    relevant_slots,
    scores_from_ranks,
)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.4, 0.35, 1.0])
def test_backfilled_mask_is_the_head_of_the_order(t):
    order = backfill_order(100, seed=2)
    mask = backfilled_mask(order, t)
    assert mask.dtype == torch.bool and mask.shape == (100,)
    m = backfilled_count(t, 100)
    assert int(mask.sum()) == m
    assert mask[torch.as_tensor(order[:m])].all() and not mask[torch.as_tensor(order[m:])].any()


def random_systems(q=7, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.as_tensor(rng.normal(size=shape).astype("f4") * scale)
            for shape, scale in [((q, 4), 1), ((n, 4), 1), ((q, 6), 2), ((n, 6), 2)]]


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_merged_ranking_orders_by_each_items_own_system(t):
    oq, og, nq, ng = random_systems()
    d_old, d_new = euclidean_distances(oq, og), euclidean_distances(nq, ng)
    is_new = backfilled_mask(backfill_order(len(og), seed=1), t)
    ranking, merged = merged_ranking(d_old, d_new, is_new)
    expected = np.where(is_new.numpy(), d_new.numpy(), d_old.numpy())
    np.testing.assert_array_equal(merged.numpy(), expected)
    np.testing.assert_array_equal(ranking.numpy(), np.argsort(expected, axis=1, kind="stable"))
    for i in range(len(oq)):  # the top-1 is eq. 3-4's choice between the two nearest items
        old_part, new_part = np.flatnonzero(~is_new.numpy()), np.flatnonzero(is_new.numpy())
        candidates = []
        if len(old_part):
            candidates.append(old_part[d_old[i, old_part].argmin()])
        if len(new_part):
            candidates.append(new_part[d_new[i, new_part].argmin()])
        assert ranking[i, 0] == min(candidates, key=lambda g: expected[i, g])


def test_merged_ranking_ties_by_index_and_excluded_items_last():
    d_old = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    d_new = torch.tensor([[2.0, 9.0, 1.0, 9.0]])
    is_new = torch.tensor([False, False, True, False])
    excluded = torch.tensor([[False, False, False, True]])
    ranking, merged = merged_ranking(d_old, d_new, is_new, excluded)
    assert merged.tolist() == [[1.0, 2.0, 1.0, 0.5]]
    assert ranking.tolist() == [[0, 2, 1, 3]]


def test_counts_below_matches_a_direct_count():
    rng = np.random.default_rng(3)
    c, n, num_segments = 3, 50, 5
    keys = torch.as_tensor(rng.permutation(10 * c * n)[: c * n].reshape(c, n).astype(np.int64))
    thresholds = torch.as_tensor(rng.integers(0, 10 * c * n, size=(c, 6)))
    thresholds[:, -1] = NO_RANK  # a padding slot: every key is below it
    thresholds = torch.sort(thresholds, dim=1).values
    segment = torch.as_tensor(rng.integers(0, num_segments, size=n))
    counts = counts_below(keys, thresholds, segment, num_segments)
    assert counts.shape == (c, num_segments, 7) and counts.dtype == torch.int32
    for row in range(c):
        for j in range(num_segments):
            for m in range(7):
                below = keys[row] < thresholds[row, m] if m < 6 else torch.ones(n, dtype=bool)
                assert counts[row, j, m] == int(((segment <= j) & below).sum())


def test_fast_merged_ranks_equal_the_direct_merged_ranking_at_every_t():
    oq, og, nq, ng = random_systems(q=6, n=60, seed=4)
    labels_q = np.arange(6) % 3
    labels_g = np.arange(60) % 3
    relevant = torch.as_tensor(labels_q[:, None] == labels_g[None, :])
    k_old, k_new = rank_keys(euclidean_distances(oq, og)), rank_keys(euclidean_distances(nq, ng))
    index, valid = relevant_slots(relevant)
    order = backfill_order(60, seed=5)
    segment = torch.as_tensor(item_segments(order, T_GRID))
    fast = _merged_ranks(k_old, k_new, index, valid, segment, len(T_GRID))
    for j, t in enumerate(T_GRID):
        ranking, _ = merged_ranking(euclidean_distances(oq, og), euclidean_distances(nq, ng),
                                    backfilled_mask(order, t))
        rank_of = torch.argsort(ranking, dim=1)  # gallery index -> 0-based merged rank
        np.testing.assert_array_equal(fast[:, j], rank_of.gather(1, index))


def test_the_books_toy_run_by_hand():
    """book/rank_merge.ipynb's toy: one query, five items, AP checked by hand."""
    old_query, new_query = np.zeros((1, 2)), np.zeros((1, 2))
    old_gallery = np.array([[3, 4], [0, 1.5], [0, 2], [6, 8], [0, 4]])
    new_gallery = np.array([[0.6, 0.8], [4, 0], [0, 0.5], [1.8, 2.4], [0, 2.5]])
    labels = np.array([0, 1, 0, 0, 1])
    order = np.array([3, 0, 4, 1, 2])
    expected = [(1 / 2 + 2 / 4 + 3 / 5) / 3, (1 / 1 + 2 / 3 + 3 / 4) / 3, (1 + 1 + 3 / 4) / 3]
    d_old = euclidean_distances(torch.as_tensor(old_query), torch.as_tensor(old_gallery))
    d_new = euclidean_distances(torch.as_tensor(new_query), torch.as_tensor(new_gallery))
    relevant = torch.as_tensor(labels == 0)
    for t, ap_by_hand in zip([0.0, 0.4, 1.0], expected, strict=True):
        ranking, _ = merged_ranking(d_old, d_new, backfilled_mask(order, t))
        ranks = torch.argsort(ranking, dim=1)[:, relevant]
        ap, _ = scores_from_ranks(ranks, torch.ones_like(ranks, dtype=torch.bool))
        assert float(ap[0]) == pytest.approx(ap_by_hand)
    curve = simulate_backfill(old_query, old_gallery, new_query, new_gallery,
                              Protocol(np.array([0]), labels), order=order, ts=[0.0, 0.4, 1.0])
    np.testing.assert_allclose(curve.mAP, expected)


def test_the_appendix_worked_example():
    """book/evaluator.ipynb's eight items: the ranks its prose reads off the tables."""
    segment = torch.as_tensor(item_segments(np.array([5, 2, 7, 0, 1, 3, 4, 6]),
                                            np.array([0.0, 0.5, 1.0])))
    k_old = torch.tensor([[40, 10, 70, 20, 50, 60, 30, 80]])
    k_new = torch.tensor([[15, 65, 5, 35, 75, 25, 45, 55]])
    index = torch.tensor([[2, 4]])
    thresholds = torch.tensor([[5, 50, 70, 75]])
    c_new = counts_below(k_new, thresholds, segment, 4)[0]
    c_old = counts_below(k_old, thresholds, segment, 4)[0]
    assert (c_new[1, 1], c_old[3, 1], c_old[1, 1]) == (3, 4, 1)
    ranks = _merged_ranks(k_old, k_new, index, torch.ones_like(index, dtype=torch.bool),
                          segment, 3)
    assert (ranks[0] + 1).tolist() == [[7, 5], [1, 7], [1, 8]]
