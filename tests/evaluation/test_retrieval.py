import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from rmlib import RmlibError
from rmlib.evaluation.retrieval import (
    EuclideanSystem,
    Protocol,
    euclidean_distances,
    evaluate,
    rank_keys,
    top1_correct,
)
from tests.conftest import clustered
from tests.reference import distance_row, scored_items


def brute_force(q, g, qlab, glab, self_excluded=False, qcam=None, gcam=None):
    aps, top1, top5 = [], [], []
    for i in range(len(q)):
        d = distance_row(q[i], g)
        keep, rel = scored_items(i, qlab, glab, self_excluded, qcam, gcam)
        if not rel.any():
            continue
        aps.append(average_precision_score(rel, -d[keep]))
        order = np.argsort(d[keep], kind="stable")
        top1.append(rel[order[0]])
        top5.append(rel[order[:5]].any())
    return np.mean(aps), np.mean(top1), np.mean(top5)


def test_distances_match_numpy():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    expected = np.sqrt(((q[:, None] - g[None]) ** 2).sum(-1))
    got = euclidean_distances(torch.tensor(q), torch.tensor(g)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("shift,scale", [(1000.0, 1.0), (-3e5, 1.0), (0.0, 1e20),
                                         (0.0, 1e-20), (1e25, 1e20)])
def test_euclidean_system_distances_do_not_depend_on_where_the_embeddings_sit(shift, scale):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(30, 64)), rng.normal(size=(50, 64))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    q, g = unit(q), unit(g)
    expected = np.sqrt(((q[:, None] - g[None]) ** 2).sum(-1))
    moved = EuclideanSystem.of(q * scale + shift, g * scale + shift).distances()
    assert moved.dtype == torch.float32
    np.testing.assert_allclose(moved.numpy() / scale, expected, rtol=1e-5, atol=1e-6)


def test_euclidean_system_refuses_what_float32_cannot_hold():
    x = np.random.default_rng(2).normal(size=(20, 8))
    with pytest.raises(RmlibError, match="beyond what float32 distances hold"):
        EuclideanSystem.of(x * 1e300, x * 1e300)
    with pytest.raises(RmlibError, match="below what float32 distances resolve"):
        EuclideanSystem.of(x * 1e-300, x * 1e-300)
    same = EuclideanSystem.of(np.ones((3, 4)), np.ones((5, 4)))  # one point: all zero
    assert same.distances().abs().max() == 0


def test_rank_keys_order_by_distance_then_index():
    d = torch.tensor([[0.5, 0.2, 0.5, 0.0, -0.0]])
    keys = rank_keys(d)
    order = torch.argsort(keys, dim=1)[0].tolist()
    assert order == [3, 4, 1, 0, 2]  # -0.0 ties with 0.0, broken by index
    excl = torch.tensor([[False, True, False, False, False]])
    assert torch.argsort(rank_keys(d, excl), dim=1)[0].tolist()[-1] == 1


def test_leave_one_out_metrics_match_brute_force():
    labels, x = clustered(300, 6, 10, 1.0, seed=1)
    got = evaluate(x, x, Protocol.leave_one_out(labels), chunk=64).summary()
    ap, t1, t5 = brute_force(x, x, labels, labels, self_excluded=True)
    # the evaluator ranks float32 distances, whose rounding differs between AVX2 and AVX-512
    # kernels: a near-tie may swap two items, moving mAP by ~1e-6 (seen on an Intel CPU)
    assert got["mAP"] == pytest.approx(ap, abs=1e-5)
    assert got["top1"] == pytest.approx(t1)
    assert got["top5"] == pytest.approx(t5)


def test_camera_protocol_matches_brute_force():
    rng = np.random.default_rng(2)
    ql, q = clustered(80, 5, 8, 0.8, seed=2)
    gl, g = clustered(200, 5, 9, 0.8, seed=3)
    qc, gc = rng.integers(1, 4, 80), rng.integers(1, 4, 200)
    got = evaluate(q, g, Protocol.camera(ql, gl, qc, gc)).summary()
    ap, t1, t5 = brute_force(q, g, ql, gl, qcam=qc, gcam=gc)
    assert got["mAP"] == pytest.approx(ap, abs=1e-5)  # float32 near-ties, as above
    assert got["top1"] == pytest.approx(t1)


def test_same_camera_matches_and_queries_without_match_are_removed():
    # query 0 (id 1, cam 1): gallery item 0 is id 1 cam 1 (removed), item 2 is id 1 cam 2.
    q = np.array([[0.0], [5.0]], np.float32)
    g = np.array([[0.0], [1.0], [2.0], [5.0]], np.float32)
    protocol = Protocol.camera(np.array([1, 2]), np.array([1, 0, 1, 2]),
                               np.array([1, 1]), np.array([1, 2, 2, 1]))
    scores = evaluate(q, g, protocol)
    # query 0: after removal ranking is [1 (distractor 0), 2 (match)] -> AP 1/2, top1 miss
    assert scores.ap[0] == pytest.approx(0.5)
    assert not scores.hits[1][0] and scores.hits[5][0]
    # query 1's only match (item 3) is the same camera: the query is not valid
    assert scores.valid.tolist() == [True, False]
    assert scores.summary()["mAP"] == pytest.approx(0.5)


def test_ties_are_broken_by_gallery_index():
    q = np.zeros((1, 2), np.float32)
    g = np.array([[1, 0], [0, 1], [1, 0]], np.float32)  # all at distance 1
    protocol = Protocol(np.array([7]), np.array([3, 7, 7]))
    scores = evaluate(q, g, protocol)
    assert scores.ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert not top1_correct(EuclideanSystem.of(q, g), protocol)[0]
