"""Training-free calibration of a retrieval system's distances (the `RM_naive+cal` baseline).

Rank merge compares an old-system distance with a new-system one, and the two scales need
not agree. Without learning anything, each system's distance can be mapped to the
probability that a pair at that distance is relevant, estimated by isotonic regression on
pairs of *training* items (never test ones), and the two systems merged by that
probability. The map is made strictly increasing in the distance, so that each system's
own ranking is kept and only the merge changes.

Explained in the book: book/rank_merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rmlib.evaluation.retrieval import EuclideanSystem

# The slope added to 1 - P(relevant) so that the map is strictly increasing: small enough
# to leave the merge to the probabilities, large enough for float32 to keep a system's order.
TIE_SLOPE = 1e-3


@dataclass(frozen=True)
class DistanceCalibration:
    """distance -> 1 - P(relevant | distance) (+ a tiny slope): small is good, as a distance."""

    knots: np.ndarray  # distances, increasing
    probabilities: np.ndarray  # P(relevant) at the knots, non-increasing
    scale: float  # the largest distance seen, for the slope

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, anchors: int = 500,
            gallery: int = 10_000, seed: int = 0, queries: np.ndarray | None = None
            ) -> DistanceCalibration:
        """Isotonic regression of relevance on distance, over the pairs between `anchors`
        random training items and `gallery` others (a pair of an item with itself left out).
        `queries`: the anchors' query-side embeddings when a system's queries live in
        another embedding than its gallery (a reverse-transformed new query against old
        gallery items), row for row with `embeddings`; default `embeddings`."""
        from sklearn.isotonic import IsotonicRegression

        queries = embeddings if queries is None else queries
        if len(queries) != len(embeddings):
            raise ValueError(f"queries has {len(queries)} rows, embeddings {len(embeddings)}: "
                             "they embed the same items")
        rng = np.random.default_rng(seed)
        n = len(labels)
        a = rng.choice(n, min(anchors, n), replace=False)
        g = rng.choice(n, min(gallery, n), replace=False)
        d = EuclideanSystem.of(queries[a], embeddings[g]).distances().numpy()
        relevant = labels[a][:, None] == labels[g][None, :]
        keep = a[:, None] != g[None, :]
        iso = IsotonicRegression(increasing=False, out_of_bounds="clip")
        iso.fit(d[keep].astype(np.float64), relevant[keep].astype(np.float64))
        return cls(np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_),
                   float(d.max()) or 1.0)

    def probability(self, distances: torch.Tensor) -> torch.Tensor:
        """P(relevant) at `distances`, linear between the knots, constant beyond them."""
        x = torch.as_tensor(self.knots, dtype=torch.float64)
        y = torch.as_tensor(self.probabilities, dtype=torch.float64)
        if len(x) == 1:
            return y.expand(distances.shape).clone()
        d = distances.double().clamp(float(x[0]), float(x[-1]))
        i = torch.searchsorted(x, d).clamp(1, len(x) - 1)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        w = torch.where(x1 > x0, (d - x0) / (x1 - x0).clamp_min(1e-300), torch.zeros_like(d))
        return y0 + w * (y1 - y0)

    def __call__(self, distances: torch.Tensor) -> torch.Tensor:
        """The merge score of each distance: 1 - P(relevant) + TIE_SLOPE * d / scale."""
        score = 1.0 - self.probability(distances) + TIE_SLOPE * distances.double() / self.scale
        return score.clamp_min(0.0).float()
