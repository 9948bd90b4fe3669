"""Closed-form query transforms: Procrustes and least-squares affine psi, against scipy's
and scikit-learn's solvers, and as objectives of fit_transforms (cached, reloaded)."""

import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.engine import closed_form
from rmlib.engine.transforms import (
    TransformConfig,
    TransformObjective,
    Transforms,
    cached_transforms,
    fit_transforms,
    register_objective,
)


def pairs(n=400, d_new=16, d_old=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_new)), rng.normal(size=(n, d_old))


def test_procrustes_is_scipys_orthogonal_procrustes():
    from scipy.linalg import orthogonal_procrustes

    new, old = pairs()
    w = closed_form.procrustes(new, old)
    r, _ = orthogonal_procrustes(new, old)  # argmin ||new R - old||, R orthogonal
    np.testing.assert_allclose(w, r.T, atol=1e-10)
    np.testing.assert_allclose(w @ w.T, np.eye(16), atol=1e-10)


def test_procrustes_recovers_a_rotation_and_is_semi_orthogonal_across_widths():
    rng = np.random.default_rng(1)
    new = rng.normal(size=(300, 12))
    rotation = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    np.testing.assert_allclose(closed_form.procrustes(new, new @ rotation.T), rotation,
                               atol=1e-10)
    for d_new, d_old in ((16, 8), (8, 16)):
        new, old = pairs(d_new=d_new, d_old=d_old)
        w = closed_form.procrustes(new, old)
        assert w.shape == (d_old, d_new)
        small = min(d_new, d_old)
        gram = w @ w.T if d_old < d_new else w.T @ w
        np.testing.assert_allclose(gram, np.eye(small), atol=1e-10)
        # no other semi-orthogonal map of a random draw does better
        q = np.linalg.qr(np.random.default_rng(2).normal(size=(max(d_new, d_old), small)))[0]
        other = q.T if d_old < d_new else q
        assert np.linalg.norm(new @ w.T - old) <= np.linalg.norm(new @ other.T - old)


def test_affine_is_scikit_learns_linear_regression():
    from sklearn.linear_model import LinearRegression

    new, old = pairs(d_new=10, d_old=6)
    old = old + 3.0  # an offset the bias must take
    w, b = closed_form.affine(new, old)
    ref = LinearRegression().fit(new, old)
    np.testing.assert_allclose(w, ref.coef_, atol=1e-9)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-9)


@pytest.mark.parametrize("method", ["procrustes", "affine"])
def test_closed_form_objectives_fit_in_one_step_and_cache(method, tmp_path):
    rng = np.random.default_rng(3)
    new = rng.normal(size=(200, 16))
    new = (new / np.linalg.norm(new, axis=1, keepdims=True)).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    old = (new @ rotation.T).astype(np.float32)  # unit length: the old space, rotated
    config = TransformConfig(objective=method, epochs=0, hidden=0)
    t = fit_transforms(config, old, new, np.zeros(200, np.int64), progress=False)
    assert t.history[0]["closed_form"] == method and t.rho is None
    np.testing.assert_allclose(t.reverse(new), old, atol=1e-4)  # an exact fit, normalised
    first = cached_transforms(config, old, new, np.zeros(200, np.int64), tmp_path, False)
    again = Transforms.from_state(torch.load(next(tmp_path.rglob("t.pt")), weights_only=True))
    np.testing.assert_array_equal(again.reverse(new), first.reverse(new))
    with pytest.raises(RmlibError, match="rho is trained with"):
        TransformConfig(objective=method, rho=True)


def test_an_objective_has_a_loss_or_a_solver_not_both_nor_neither():
    for loss, solve in ((None, None), (lambda *a: 0, lambda *a: None)):
        with pytest.raises(RmlibError, match="give a loss .* or a solve"):
            register_objective(TransformObjective("half-made", loss, solve=solve))
