"""How the answers of the two parts become one: the merged result, its comparison up to
float32 rounding, and the gate that keeps a search from mixing two states of a batch.

Explained in the book: book/serving.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass
class SearchResult:
    """Merged top-k per query: Euclidean distances, gallery ids, and the part (0 old, 1 new)."""

    distances: np.ndarray
    ids: np.ndarray
    parts: np.ndarray

    def agrees_with(self, other: SearchResult, atol: float) -> np.ndarray:
        """Per query, whether two results rank alike up to float32 rounding: at every rank
        both hold an item at the same squared distance, within `atol`.

        Engines compute |q - g|^2 as |q|^2 + |g|^2 - 2 q.g in float32 by different routes,
        so a squared distance is known only to a few float32 epsilons of the squared norms
        involved (a dot product of d terms adds up to about sqrt(d) of them): `atol` =
        1e-5 x the largest squared norm is a safe bound (`float32_tolerance`). Items tied
        within it may swap; any other difference is a different ranking."""
        a, b = self.distances.astype(np.float64) ** 2, other.distances.astype(np.float64) ** 2
        same_missing = np.isfinite(a) == np.isfinite(b)
        close = np.abs(np.where(np.isfinite(a) & np.isfinite(b), a - b, 0)) <= atol
        return (close & same_missing).all(1)


def float32_tolerance(*embeddings: np.ndarray) -> float:
    """The float32 error bound of squared distances among these embeddings (for
    `SearchResult.agrees_with`): 1e-5 (about 80 float32 epsilons) x the largest squared
    norm."""
    return 1e-5 * max(float(np.square(np.asarray(x, dtype=np.float64)).sum(1).max())
                      for x in embeddings)


class SearchGate:
    """Searches run side by side; a batch changes which part serves its moving items only
    when no search is in flight, so a search never mixes two rules. A waiting change goes
    first: new searches wait for it, so a stream of searches cannot stall the backfill."""

    def __init__(self):
        self._cond = threading.Condition()
        self._searches = 0
        self._changes_waiting = 0

    @contextmanager
    def searching(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._changes_waiting == 0)
            self._searches += 1
        try:
            yield
        finally:
            with self._cond:
                self._searches -= 1
                self._cond.notify_all()

    @contextmanager
    def changing(self) -> Iterator[None]:
        with self._cond:
            self._changes_waiting += 1
            try:
                self._cond.wait_for(lambda: self._searches == 0)
                yield
            finally:
                self._changes_waiting -= 1
                self._cond.notify_all()
