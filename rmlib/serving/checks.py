"""Checks of what a live index is handed, before anything is written: arrays, counts,
names, widths. Each mistake is one line that says what to pass instead.

Explained in the book: book/serving.
"""

from __future__ import annotations

import json
import re

import numpy as np

from rmlib import RmlibError
from rmlib.serving.parts import Backend

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,250}")  # a Milvus collection name, less "_old"


def gallery_rows(x: np.ndarray) -> np.ndarray:
    """The old gallery, at least one item of at least one dimension (faiss and Milvus fail
    later, and less clearly, on an empty one)."""
    shape = np.shape(x)
    if len(shape) != 2 or 0 in shape:
        raise RmlibError(f"old_gallery must be a non-empty array (n, d) with n, d >= 1, got "
                         f"shape {shape}")
    return float_rows("old_gallery", x, shape[1])


def float_rows(name: str, x: np.ndarray, dim: int) -> np.ndarray:
    """Finite float32 rows of width `dim`, contiguous, as faiss and Milvus take them."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise RmlibError(f"{name} must have shape (n, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise RmlibError(f"{name} has NaN or inf; re-extract those embeddings")
    return x


def id_array(ids: np.ndarray) -> np.ndarray:
    """Gallery ids as int64 (an empty list of any type is an empty batch)."""
    ids = np.asarray(ids)
    if ids.shape == (0,):
        return ids.astype(np.int64)  # an empty batch, whatever its type
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise RmlibError(f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    return ids.astype(np.int64)


def check_meta(meta: dict | None) -> dict:
    """`meta` as the journal will give it back: JSON, unchanged by a round trip."""
    meta = {} if meta is None else meta
    try:
        if not isinstance(meta, dict) or json.loads(json.dumps(meta)) != meta:
            raise TypeError
    except (TypeError, ValueError):
        raise RmlibError("meta must be a dict of JSON values (str keys; str, number, bool, "
                         "None, list, dict values)") from None
    return meta


def id_sum(ids: np.ndarray) -> int:
    """A checksum of a set of ids (with their count, it tells a gallery from another)."""
    return int(np.sum(ids, dtype=np.uint64))


def check_name(name: str) -> str:
    """A live index's name, checked here: Milvus refuses a bad one in a long traceback."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RmlibError(f"{name!r} cannot name a live index: use 1 to 251 letters, digits and "
                         "underscores, starting with a letter or an underscore (the Milvus "
                         "collections are NAME_old and NAME_new)")
    return name


def check_dims(dims: dict[str, int], backend: Backend) -> None:
    """The widths a backend stores (Milvus: 2 to 32,768): say so before anything is
    written."""
    if backend.dims is None:
        return
    low, high = backend.dims
    for part, dim in dims.items():
        if not low <= dim <= high:
            raise RmlibError(f"{backend.name} stores vectors of {low} to {high:,} dimensions, "
                             f"and the {part} embeddings have {dim}: serve them in faiss "
                             "(Python: backend='faiss'), or embed with another width")
