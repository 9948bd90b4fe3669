"""Closed-form query transforms: psi fitted in one step, no epochs, no labels.

The cheap end of the spectrum of post-hoc maps (Drift-Adapter, EMNLP 2025, maps a new text
encoder's queries into an old index this way): given the old and the new model's
embeddings of the same training items, O (N x d_old) and X (N x d_new),
  - orthogonal Procrustes: W = argmin ||X W^T - O||_F over W with orthonormal rows or
    columns, W = U V^T from the SVD U S V^T of O^T X (when the widths differ, the
    semi-orthogonal solution: the zero-padded problem's map, cut to size);
  - least-squares affine: W, b = argmin ||X W^T + b - O||_F, by its normal equations.
psi(x) = normalise(W x [+ b]), onto the unit sphere the old embeddings live on.

A closed-form rho (a map of the new embedding) does not help these families: the joint
least-squares problem min ||psi(rho(X)) - O|| + ||rho(X) - X|| is solved by rho = the
identity whenever psi may be any linear map, so the rows here have psi alone.

Explained in the book: book/beyond_two.
"""

from __future__ import annotations

import numpy as np


def procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """W (d_old x d_new) with orthonormal rows or columns that best maps `new` onto `old`."""
    m = np.asarray(old, np.float64).T @ np.asarray(new, np.float64)  # d_old x d_new
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def affine(new: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W (d_old x d_new) and b (d_old,) of the least-squares affine map of `new` onto `old`."""
    x = np.asarray(new, np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    # the normal equations, in float64: a (d_new + 1)-square system instead of an SVD of
    # the N-row design (0.1 s against 4 s for 50,000 x 128); lstsq of the small system
    # still gives the least-norm solution when some directions are never used
    beta, *_ = np.linalg.lstsq(design.T @ design, design.T @ np.asarray(old, np.float64),
                               rcond=None)
    return beta[:-1].T, beta[-1]
