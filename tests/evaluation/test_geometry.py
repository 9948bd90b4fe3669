"""rmlib.evaluation.geometry: the distances a merged ranking compares, and the cone."""

import numpy as np
import pytest

from rmlib.evaluation.geometry import part_distances, spread
from rmlib.evaluation.systems import SystemPair


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype("f4")


def test_a_packed_old_part_puts_its_irrelevant_items_before_the_new_parts_relevant_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    centres = rng.normal(size=(4, 16))
    new = _unit(centres[labels] + 0.3 * rng.normal(size=(200, 16)))  # spread out, by class
    old = _unit(np.ones(16) + 0.05 * rng.normal(size=(200, 16)))  # one narrow cone
    d = part_distances(SystemPair(old, old, new, new, labels), queries=100)
    assert d["old irrelevant"] < 0.2 < d["new relevant"] < d["new irrelevant"]
    assert d["old irrelevant closer than new relevant"] > 0.95
    assert d["new irrelevant closer than old relevant"] < 0.05
    same = part_distances(SystemPair(new, new, new, new, labels), queries=100)
    crossing = same["new irrelevant closer than old relevant"]
    assert crossing == pytest.approx(same["old irrelevant closer than new relevant"], abs=0.05)
    assert crossing < 0.1  # one good system on both sides: per query, relevant comes first


def test_part_distances_follow_the_camera_protocol():
    labels, cams = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    x = _unit(np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=float))
    query = _unit(np.array([[1, 0.005]]))
    pair = SystemPair(query, x, query, x, np.array([0]), labels, np.array([0]), cams)
    d = part_distances(pair, queries=1)
    # the same-id same-camera item (index 0) is removed: the one relevant item is index 1
    assert d["new relevant"] == pytest.approx(np.linalg.norm(query[0] - x[1]), abs=1e-5)

def test_the_query_itself_is_left_out_when_the_gallery_is_the_query_set():
    x = _unit(np.eye(3)[[0, 0, 1]] + 0.01)
    d = part_distances(SystemPair(x, x, x, x, np.array([0, 0, 1])), queries=3)
    assert d["new relevant"] == pytest.approx(0.0, abs=1e-3)  # the twin, not itself
    assert d["new irrelevant"] > 1


def test_spread_of_a_cone_and_of_the_sphere():
    rng = np.random.default_rng(1)
    sphere = _unit(rng.normal(size=(3000, 32)))
    cone = _unit(np.ones(32) + 0.1 * rng.normal(size=(3000, 32)))
    wide, narrow = spread(sphere), spread(cone)
    assert wide["mean_vector_length"] < 0.05 < 0.9 < narrow["mean_vector_length"]
    assert wide["median_pair_distance"] == pytest.approx(np.sqrt(2), abs=0.02)
    assert narrow["median_distance_to_neighbour_8"] < narrow["median_pair_distance"] < 0.3


def test_a_packed_old_part_fills_the_merged_lists_whatever_the_ratio():
    from rmlib.evaluation.backfill import merged_top_k
    from rmlib.evaluation.geometry import merged_shares

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    new = _unit(rng.normal(size=(4, 16))[labels] + 0.3 * rng.normal(size=(200, 16)))
    old = _unit(np.ones(16) + 0.05 * rng.normal(size=(200, 16)))
    pair = SystemPair(old, old, new, new, labels)
    packed = merged_shares(pair, ts=(0.25, 0.5), k=10, queries=200)
    assert packed["0.25"]["from_new_part"] < 0.05 and packed["0.5"]["from_new_part"] < 0.05
    # the evaluator's own merged list of one query agrees
    one = merged_top_k(pair, query=0, t=0.5, k=10)
    assert sum(part == "new" for _, _, part, _ in one) <= 1
    fair = merged_shares(SystemPair(new, new, new, new, labels), ts=(0.5,), k=10, queries=200)
    assert 0.35 < fair["0.5"]["from_new_part"] < 0.65  # one system: each part its share
    assert fair["0.5"]["new_items_relevant"] > 0.9 and fair["0.5"]["old_items_relevant"] > 0.9


def test_centring_on_a_training_mean_opens_the_cone_and_keeps_the_reference():
    from rmlib.evaluation.systems import centred
    from rmlib.methods.selection import centring_decision

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(8), 100)
    classes = rng.normal(size=(8, 16))
    old = _unit(np.ones(16) * 3 + classes[labels] + 0.3 * rng.normal(size=(800, 16)))
    new = _unit(classes[labels] + 0.3 * rng.normal(size=(800, 16)))
    pair = SystemPair(old, old, new, new, labels)
    moved = centred(pair, old.mean(axis=0), new.mean(axis=0))
    assert spread(moved.old_gallery)["mean_vector_length"] < 0.05 < 0.9 < \
        spread(old)["mean_vector_length"]
    np.testing.assert_allclose(np.linalg.norm(moved.old_gallery, axis=1), 1, atol=1e-5)
    assert moved.reference_side()[0] is old  # negative flips against the deployed system
    fit, val = np.arange(0, 800, 2), np.arange(1, 800, 2)
    decision = centring_decision(old, new, labels, fit, val)
    assert decision["centred"]["rm_naive_auc_mAP"] > decision["raw"]["rm_naive_auc_mAP"]
    assert decision["validation_items"] == 400 and "half a point" in decision["rule"]

