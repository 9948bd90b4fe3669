import numpy as np
import pytest

from rmlib import RmlibError
from rmlib.evaluation.backfill import (
    T_GRID,
    backfill_order,
    backfilled_count,
    item_segments,
    simulate_backfill,
)
from rmlib.evaluation.curves import check_conditions
from rmlib.evaluation.retrieval import Protocol, evaluate
from tests.conftest import clustered
from tests.reference import reference_curve

KEYS = ("mAP", "top1", "top5", "nfr")


def assert_matches(curve, ref):
    # Both evaluators rank float32 distances, which AVX2 and AVX-512 kernels round
    # differently: a near-tie may swap, moving a mean over the queries by ~1e-6.
    for k in KEYS:
        np.testing.assert_allclose(getattr(curve, k), ref[k], atol=1e-5, err_msg=k)


def two_systems(n=240, seed=0):
    labels, old = clustered(n, 6, 9, 1.3, seed=seed)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(9, 6)) * 1.7  # a differently scaled space: calibration matters
    new = (centres[labels] + 0.8 * rng.normal(size=(n, 6))).astype(np.float32)
    return labels, old, new


def test_grid_and_counts():
    assert len(T_GRID) == 21 and T_GRID[0] == 0 and T_GRID[-1] == 1
    assert [backfilled_count(t, 100) for t in T_GRID] == list(range(0, 101, 5))
    assert backfilled_count(0.35, 100) == 35
    order = backfill_order(10, seed=3)
    assert sorted(order) == list(range(10))
    seg = item_segments(order, np.array([0.0, 0.5, 1.0]))
    assert (seg[order[:5]] == 1).all() and (seg[order[5:]] == 2).all()


def test_leave_one_out_curve_matches_reference():
    labels, old, new = two_systems()
    curve = simulate_backfill(old, old, new, new, Protocol.leave_one_out(labels), chunk=50)
    assert_matches(curve, reference_curve(old, old, new, new, labels))


def test_market_style_curve_with_reverse_query_matches_reference():
    rng = np.random.default_rng(5)
    ql, _ = clustered(60, 6, 9, 1.0, seed=5)
    gl, og = clustered(150, 6, 10, 1.2, seed=6)
    centres = rng.normal(size=(10, 6))
    ng = (centres[gl] + 0.7 * rng.normal(size=(150, 6))).astype(np.float32)
    nq = (centres[ql] + 0.7 * rng.normal(size=(60, 6))).astype(np.float32)
    rev_q = (nq + 0.3 * rng.normal(size=nq.shape)).astype(np.float32)  # psi(new query)
    ref_q = (og[:60] + 0.5).astype(np.float32)  # the deployed old model's queries
    qc, gc = rng.integers(1, 4, 60), rng.integers(1, 4, 150)
    protocol = Protocol.camera(ql, gl, qc, gc)
    curve = simulate_backfill(rev_q, og, nq, ng, protocol, seed=4, reference_query=ref_q)
    ref = reference_curve(rev_q, og, nq, ng, ql, gl, qc, gc, ref_q=ref_q, seed=4)
    assert_matches(curve, ref)


def test_endpoints_equal_the_single_systems():
    labels, old, new = two_systems(seed=1)
    protocol = Protocol.leave_one_out(labels)
    curve = simulate_backfill(old, old, new, new, protocol, seed=7)
    o = evaluate(old, old, protocol).summary()
    n = evaluate(new, new, protocol).summary()
    for k in ("mAP", "top1", "top5"):
        assert getattr(curve, k)[0] == pytest.approx(o[k], abs=1e-12)
        assert getattr(curve, k)[-1] == pytest.approx(n[k], abs=1e-12)
    assert curve.nfr[0] == 0.0


def test_identical_systems_give_a_flat_curve_and_ties_across_systems():
    labels, x = clustered(120, 4, 6, 1.0, seed=2)
    curve = simulate_backfill(x, x, x.copy(), x.copy(), Protocol.leave_one_out(labels))
    assert np.ptp(curve.mAP) < 1e-12 and np.ptp(curve.top1) == 0 and max(curve.nfr) == 0
    assert curve.auc("mAP") == pytest.approx(curve.mAP[0])


def test_identical_rankings_give_bit_identical_values_at_every_t_and_chunking():
    """The old system merged with itself ranks identically at every t: its curve must be
    flat to the last bit, whatever the chunking or the CPU's vector width (AP summed in
    rank order per query, then exactly across queries)."""
    labels, old = clustered(1500, 32, 60, 1.6, seed=8)
    protocol = Protocol.leave_one_out(labels)
    curves = [simulate_backfill(old, old, old, old, protocol, seed=s, chunk=c)
              for s, c in ((0, None), (1, 37), (2, 1000))]
    for curve in curves:
        for k in KEYS:
            assert len(set(getattr(curve, k))) == 1, k
            assert getattr(curve, k) == getattr(curves[0], k), k
    assert evaluate(old, old, protocol).summary()["mAP"] == curves[0].mAP[0]


def test_a_custom_order_and_grid():
    labels, old, new = two_systems(seed=3)
    order = np.arange(len(labels))[::-1].copy()
    ts = np.array([0.0, 0.3, 1.0])
    curve = simulate_backfill(old, old, new, new, Protocol.leave_one_out(labels),
                              order=order, ts=ts)
    assert_matches(curve, reference_curve(old, old, new, new, labels, order=order, ts=ts))
    with pytest.raises(RmlibError, match="permutation"):
        simulate_backfill(old, old, new, new, Protocol.leave_one_out(labels),
                          order=np.zeros(len(labels), int))


def test_auc_is_the_trapezoid_rule_and_conditions():
    labels, old, new = two_systems(seed=4)
    curve = simulate_backfill(old, old, new, new, Protocol.leave_one_out(labels))
    t, m = np.array(curve.t), np.array(curve.mAP)
    assert curve.auc("mAP") == pytest.approx(((m[1:] + m[:-1]) / 2 * np.diff(t)).sum())
    cond = check_conditions(curve, {"mAP": curve.mAP[0], "top1": curve.top1[0]},
                            {"mAP": curve.mAP[-1] + 0.1, "top1": curve.top1[-1]})
    assert cond["mAP"]["cond6_M0_ge_old"] and not cond["mAP"]["cond7_M1_ge_new"]
    falls = np.maximum.accumulate(m) - m
    assert cond["mAP"]["drawdown"] == pytest.approx(falls.max())
    assert cond["mAP"]["cond8_no_fall_beyond_noise"] == (falls.max() <= 1e-12)


def test_average_curves_are_the_mean_and_spread_over_seeds():
    from rmlib.evaluation.curves import average_curves

    labels, old, new = two_systems()
    protocol = Protocol.leave_one_out(labels)
    curves = [simulate_backfill(old, old, new, new, protocol, seed=s) for s in range(3)]
    mean, spread = average_curves(curves)
    for k in KEYS:
        np.testing.assert_allclose(getattr(mean, k), np.mean([getattr(c, k) for c in curves], 0))
    aucs = [c.auc("mAP") for c in curves]
    assert spread["auc_mAP_seeds"] == aucs and len(set(aucs)) > 1
    assert spread["auc_mAP_std"] == pytest.approx(np.std(aucs, ddof=1))
    assert mean.auc("mAP") == pytest.approx(np.mean(aucs))
    np.testing.assert_allclose(spread["mAP_std"],
                               np.std([c.mAP for c in curves], axis=0, ddof=1))
    single, one = average_curves(curves[:1])
    assert one["auc_mAP_std"] == 0 and single.mAP == curves[0].mAP


def test_calibrated_merge_repairs_a_mis_scaled_system():
    """The new system is the old one with every distance tripled: the naive merge sinks
    the backfilled items, a merge by P(relevant | distance), fitted on other data of the
    same systems, does not; each system's own ranking is kept."""
    import torch

    from rmlib.evaluation.calibration import DistanceCalibration

    all_labels, all_x = clustered(1500, 8, 12, 1.1, seed=21)
    labels, x = all_labels[:600], all_x[:600]
    train_labels, train_x = all_labels[600:], all_x[600:]  # the same classes, other items
    protocol = Protocol.leave_one_out(labels)
    naive = simulate_backfill(x, x, 3 * x, 3 * x, protocol)
    cal = (DistanceCalibration.fit(train_x, train_labels),
           DistanceCalibration.fit(3 * train_x, train_labels))
    calibrated = simulate_backfill(x, x, 3 * x, 3 * x, protocol, calibration=cal)
    flat = naive.mAP[0]  # both ends are the same system
    assert min(naive.mAP) < flat - 0.02
    assert min(calibrated.mAP) > flat - 0.01
    # each end is one system merged with itself: its own ranking, up to float32 near-ties
    assert calibrated.mAP[0] == pytest.approx(flat, abs=1e-4)
    assert calibrated.mAP[-1] == pytest.approx(flat, abs=1e-4)
    d = torch.linspace(0, float(cal[0].scale), 500)
    score = cal[0](d)
    assert (score[1:] > score[:-1]).all()  # strictly increasing: a system's order is kept
    p = cal[0].probability(d)
    assert (p[1:] <= p[:-1] + 1e-12).all() and 0 <= float(p.min()) <= float(p.max()) <= 1


def test_negative_flips_count_against_the_deployed_old_system_whatever_the_old_part():
    """An FCT-like row searches an upgraded old gallery h(phi_old(g)) with new queries; its
    negative flips are still counted against phi_old(q) on phi_old(g). At t = 1 it is the
    same system as the naive merge's, so it flips the same queries."""
    from rmlib.evaluation.backfill import backfill_arrays
    from rmlib.evaluation.systems import SystemPair

    labels, old = clustered(120, 8, 6, 1.0, seed=1)
    _, new = clustered(120, 12, 6, 0.6, seed=2)
    upgraded = np.tanh(old @ np.random.default_rng(3).normal(size=(8, 12))).astype("f4")
    naive = SystemPair(old, old, new, new, labels)
    fct = SystemPair(new, upgraded, new, new, labels, reference_query=old,
                         reference_gallery=old)
    curve_naive, cond_naive = backfill_arrays(naive)
    curve_fct, cond_fct = backfill_arrays(fct)
    assert curve_fct.nfr[-1] == curve_naive.nfr[-1] > 0
    assert cond_fct["mAP"]["old"] == cond_naive["mAP"]["old"]  # the deployed old system's mAP
    with pytest.raises(RmlibError, match="reference_gallery is given without reference_query"):
        SystemPair(new, upgraded, new, new, labels, reference_gallery=old)
    with pytest.raises(RmlibError, match="reference_gallery has 119 rows"):
        SystemPair(new, upgraded, new, new, labels, reference_query=old,
                       reference_gallery=old[:-1])


def test_largest_drawdown_is_the_fall_from_the_best_earlier_value_not_a_step():
    from rmlib.evaluation.curves import largest_drawdown

    assert largest_drawdown([0.3, 0.28, 0.26, 0.24, 0.3]) == (pytest.approx(0.06), 0, 3)
    assert largest_drawdown([0.1, 0.2, 0.3]) == (0.0, 0, 0)
    assert largest_drawdown([0.1, 0.5, 0.2, 0.6, 0.1]) == (pytest.approx(0.5), 3, 4)


def test_condition_8_judges_every_fall_against_its_own_noise():
    from rmlib.evaluation.curves import falls_beyond_noise

    # a large fall within its large spread, then a small fall where the seeds agree
    values, std = [0.30, 0.29, 0.31, 0.305, 0.32], [0.01, 0.01, 0.0005, 0.0005, 0.0005]
    assert falls_beyond_noise(values, std)
    assert not falls_beyond_noise([0.30, 0.29, 0.31], [0.01, 0.01, 0.01])
    assert falls_beyond_noise([0.30, 0.2999, 0.31])  # one run: any fall counts
    assert not falls_beyond_noise([0.1, 0.2, 0.2, 0.3])


@pytest.mark.parametrize("kwargs,message", [
    ({"seed": 2.5}, "seed must be an integer, not 2.5"),
    ({"seed": "3"}, "seed must be an integer, not '3'"),
    ({"seed": -1}, "seed is at least 0, not -1"),
    ({"order": np.arange(10)}, "must be a permutation of the 60 gallery items"),
    ({"order": np.arange(60.0)}, "must be a 1-D array of integer gallery indices"),
])
def test_bad_arguments_of_the_evaluator_are_one_line(kwargs, message):
    from rmlib.evaluation.backfill import backfill_arrays
    from rmlib.evaluation.systems import SystemPair

    labels, x = clustered(60, 6, 5, 1.0, seed=0)
    arrays = SystemPair(x, x, x * 2, x * 2, labels)
    with pytest.raises(RmlibError, match=message):
        backfill_arrays(arrays, **kwargs)
    numpy_seed = backfill_arrays(arrays, seed=np.int64(4))[0]  # numpy integers are integers
    assert numpy_seed.auc("mAP") == backfill_arrays(arrays, seed=4)[0].auc("mAP")


def test_a_parted_old_side_matches_a_plain_three_system_merge():
    """A gallery that already holds two models' embeddings (a second upgrade arriving
    mid-backfill): the items not yet re-embedded are scored by the system of their part."""
    import torch

    from rmlib.evaluation.backfill import PartedSystem, simulate_backfill_systems
    from rmlib.evaluation.retrieval import EuclideanSystem

    labels, first, third = two_systems(n=180, seed=2)
    rng = np.random.default_rng(9)
    second = (first + 0.6 * rng.normal(size=first.shape)).astype(np.float32)
    in_second = rng.random(len(labels)) < 0.4
    order = backfill_order(len(labels), seed=7)
    old = PartedSystem(EuclideanSystem.of(first, first), EuclideanSystem.of(second, second),
                       torch.as_tensor(in_second))
    curve = simulate_backfill_systems(old, EuclideanSystem.of(third, third),
                                      Protocol.leave_one_out(labels), order,
                                      reference=EuclideanSystem.of(first, first), chunk=40)
    ref = reference_curve(first, first, third, third, labels, order=order,
                          parted=(second, second, in_second))
    assert_matches(curve, ref)
    # every item in the second part: the same as the plain two-system evaluator on it
    all_second = PartedSystem(old.first, old.second, torch.ones(len(labels), dtype=torch.bool))
    plain = simulate_backfill(second, second, third, third, Protocol.leave_one_out(labels),
                              order=order, reference_query=first, reference_gallery=first)
    both = simulate_backfill_systems(all_second, EuclideanSystem.of(third, third),
                                     Protocol.leave_one_out(labels), order,
                                     reference=EuclideanSystem.of(first, first))
    for k in KEYS:
        np.testing.assert_allclose(getattr(both, k), getattr(plain, k), atol=1e-6)
