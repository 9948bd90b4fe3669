import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.evaluation.backfill import backfill_order, backfilled_count
from rmlib.evaluation.retrieval import euclidean_distances, rank_keys
from rmlib.serving.index import OnlineBackfillIndex


def data(n=400, q=30, d_old=8, d_new=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d_old)).astype("f4"), rng.normal(size=(n, d_new)).astype("f4"),
            rng.normal(size=(q, d_old)).astype("f4"), rng.normal(size=(q, d_new)).astype("f4"))


def offline_top_k(old_g, new_g, old_q, new_q, is_new, k):
    """The offline evaluator's merged ranking (rank keys), truncated to k."""
    d_old = euclidean_distances(torch.as_tensor(old_q), torch.as_tensor(old_g))
    d_new = euclidean_distances(torch.as_tensor(new_q), torch.as_tensor(new_g))
    merged = torch.where(torch.as_tensor(is_new)[None, :], d_new, d_old)
    return torch.argsort(rank_keys(merged), dim=1)[:, :k].numpy()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_merged_top_k_equals_the_offline_ranking(t):
    old_g, new_g, old_q, new_q = data()
    n = len(old_g)
    index = OnlineBackfillIndex(old_g, new_dim=new_g.shape[1])
    order = backfill_order(n, seed=1)
    done = order[: backfilled_count(t, n)]
    for batch in np.array_split(done, 3):  # in several backfill batches
        if len(batch):
            index.backfill(batch, new_g[batch])
    is_new = np.zeros(n, bool)
    is_new[done] = True
    res = index.search(new_q, old_q, k=10)
    np.testing.assert_array_equal(res.ids, offline_top_k(old_g, new_g, old_q, new_q, is_new, 10))
    np.testing.assert_array_equal(res.parts, is_new[res.ids].astype(int))
    assert index.num_old + index.num_new == n and index.ratio == pytest.approx(len(done) / n)


def test_items_are_always_in_exactly_one_part_and_re_adds_replace():
    old_g, new_g, old_q, new_q = data(n=50)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    index.backfill(np.array([3, 7]), new_g[[3, 7]])
    index.backfill(np.array([7]), new_g[[7]] * 0 + 100.0)  # re-embedding item 7
    assert index.num_new == 2 and index.num_old == 48
    assert index.part_of(np.array([3, 7, 8])).tolist() == [1, 1, 0]
    res = index.search(new_q, old_q, k=50)
    assert sorted(res.ids[0].tolist()) == list(range(50))  # every item once
    assert res.ids[0, -1] == 7  # its new embedding is far away now


def test_bad_batches_change_nothing():
    old_g, new_g, old_q, new_q = data(n=40)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    before = index.search(new_q, old_q, k=5).ids
    with pytest.raises(RmlibError, match="unknown id"):
        index.backfill(np.array([1, 99]), new_g[:2])
    with pytest.raises(RmlibError, match="repeats an id"):
        index.backfill(np.array([1, 1]), new_g[:2])
    with pytest.raises(RmlibError, match="shape"):
        index.backfill(np.array([1]), new_g[:1, :5])
    with pytest.raises(RmlibError, match="NaN"):
        index.backfill(np.array([1]), new_g[:1] * np.nan)
    assert index.num_new == 0
    np.testing.assert_array_equal(index.search(new_q, old_q, k=5).ids, before)


def test_approximate_index_finds_most_exact_neighbours():
    old_g, new_g, old_q, new_q = data(n=3000, q=50, seed=2)
    exact = OnlineBackfillIndex(old_g, new_dim=12)
    approx = OnlineBackfillIndex(old_g, new_dim=12, approximate=True, nlist=32, nprobe=8,
                                 new_training_sample=new_g)
    half = np.arange(0, 3000, 2)
    for index in (exact, approx):
        index.backfill(half, new_g[half])
    e = exact.search(new_q, old_q, k=10).ids
    a = approx.search(new_q, old_q, k=10).ids
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(e, a, strict=True)])
    assert recall > 0.8


@pytest.mark.parametrize("protocol_name", ["leave_one_out", "camera"])
def test_live_scores_reproduce_the_offline_backfill_curve(protocol_name):
    """What the live index serves, scored over the whole merged ranking, is the evaluator's
    mAP and top-1 at the same backfill states."""
    from rmlib.evaluation.backfill import simulate_backfill
    from rmlib.evaluation.retrieval import Protocol
    from rmlib.serving.index import live_scores

    rng = np.random.default_rng(3)
    n, classes = 120, 8
    labels = rng.integers(0, classes, n)
    centres_old, centres_new = rng.normal(size=(classes, 8)), rng.normal(size=(classes, 12))
    old = (centres_old[labels] + rng.normal(size=(n, 8))).astype("f4")
    new = (centres_new[labels] + 0.7 * rng.normal(size=(n, 12))).astype("f4")
    if protocol_name == "camera":
        cams = rng.integers(0, 3, n)
        protocol = Protocol.camera(labels[:40], labels, cams[:40], cams)
        old_q, new_q = old[:40] + 0.1, new[:40] + 0.1
    else:
        protocol = Protocol.leave_one_out(labels)
        old_q, new_q = old, new
    order = backfill_order(n, seed=0)
    ts = np.array([0.0, 0.25, 0.5, 1.0])
    curve = simulate_backfill(old_q, old, new_q, new, protocol, order=order, ts=ts)
    index = OnlineBackfillIndex(old, new_dim=12)
    for j, t in enumerate(ts):
        done = order[: backfilled_count(t, n)]
        todo = done[index.num_new:]
        if len(todo):
            index.backfill(todo, new[todo])
        live = live_scores(index, new_q, old_q, protocol, chunk=16).summary()
        assert live["mAP"] == pytest.approx(curve.mAP[j], abs=1e-6)
        assert live["top1"] == pytest.approx(curve.top1[j], abs=1e-6)


def test_live_scores_refuse_a_protocol_of_another_gallery():
    from rmlib.evaluation.retrieval import Protocol
    from rmlib.serving.index import live_scores

    old_g, new_g, old_q, new_q = data(n=40)
    index = OnlineBackfillIndex(old_g, new_dim=12)
    with pytest.raises(RmlibError, match="gallery items"):
        live_scores(index, new_q, old_q, Protocol.leave_one_out(np.zeros(30, int)))


def test_a_policy_order_drives_the_live_backfill_and_matches_the_offline_curve():
    """The live index re-embeds the items an order policy puts first (next_batch), and
    what it serves is the evaluator's curve under that same order."""
    from rmlib.evaluation.backfill import simulate_backfill
    from rmlib.evaluation.emb_file import BackfillArrays
    from rmlib.methods.orders import policy_order
    from rmlib.serving.index import live_scores

    rng = np.random.default_rng(5)
    n, classes = 100, 5
    labels = rng.integers(0, classes, n)
    old = (rng.normal(size=(classes, 8))[labels] + rng.normal(size=(n, 8))).astype("f4")
    new = (rng.normal(size=(classes, 12))[labels] + 0.5 * rng.normal(size=(n, 12))).astype("f4")
    arrays = BackfillArrays(old, old, new, new, labels)
    order = policy_order("oracle", arrays)
    ts = np.array([0.0, 0.3, 0.6, 1.0])
    curve = simulate_backfill(old, old, new, new, arrays.protocol(), order=order, ts=ts)
    index = OnlineBackfillIndex(old, new_dim=12)
    for j, t in enumerate(ts):
        while index.num_new < backfilled_count(t, n):
            batch = index.next_batch(order, min(7, backfilled_count(t, n) - index.num_new))
            assert not index.part_of(batch).any()  # only items still in the old part
            index.backfill(batch, new[batch])
        assert sorted(np.flatnonzero(index.part_of(np.arange(n)))) == \
            sorted(order[: backfilled_count(t, n)].tolist())
        live = live_scores(index, new, old, arrays.protocol(), chunk=16).summary()
        assert live["mAP"] == pytest.approx(curve.mAP[j], abs=1e-6)
    with pytest.raises(RmlibError, match="every gallery id once"):
        index.next_batch(order[:-1], 5)
