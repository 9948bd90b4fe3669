"""Checks of the arguments rmlib's public functions and its command line take: one line
for each mistake (the command line's are argparse types).

numpy integers are integers here (`np.int64(3)` is as good as 3); floats, strings and
booleans are not counts.

Explained in the book: book/own_upgrade.
"""

from __future__ import annotations

import argparse
import math
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


# argparse types of the command line: a bad value is one line of argparse's usage error
def int_at_least(least: int, words: str):
    """An argparse type: an integer of at least `least` (`words` says which, for the
    message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is {words}; give {least} or more")
        return value
    return parse


non_negative_int = int_at_least(0, "negative")
positive_int = int_at_least(1, "not positive")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite positive number")
    return value


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is more than 1; give a fraction in (0, 1]")
    return value
