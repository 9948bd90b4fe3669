"""Checks of the arguments rmlib's public functions take: one line for each mistake.

numpy integers are integers here (`np.int64(3)` is as good as 3); floats, strings and
booleans are not counts.

Explained in the book: book/own_upgrade.
"""

from __future__ import annotations

import operator

import numpy as np

from rmlib import RmlibError


def count(name: str, value: int, least: int = 1) -> int:
    """An integer argument (numpy's too) of at least `least`, or one line that says not."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise RmlibError(f"{name} must be an integer, not {value!r}") from None
    if value < least:
        raise RmlibError(f"{name} is at least {least}, not {value}")
    return value


def permutation(name: str, order: np.ndarray, n: int) -> np.ndarray:
    """`order` as int64 if it lists each of 0..n-1 once, or one line that says not."""
    order = np.asarray(order)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise RmlibError(f"{name} must be a 1-D array of integer gallery indices, got "
                         f"{order.dtype}{order.shape}")
    if len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        raise RmlibError(f"{name} must be a permutation of the {n} gallery items (it has "
                         f"{len(order)} entries, {len(np.unique(order))} distinct)")
    return order.astype(np.int64, copy=False)
