"""Two retrieval systems over one gallery (`SystemPair`), as the evaluator, the methods and
the serving index read them, and the checks that make them safe to evaluate.

The old system is old_query (Q, d_old) searching old_gallery (N, d_old); the new system
new_query (Q, d_new) searching new_gallery (N, d_new); query_labels (Q,) and, unless the
evaluation is leave-one-out, gallery_labels (N,) define relevance; query_cams and
gallery_cams apply Market-1501's camera protocol; reference_query and reference_gallery
are the deployed old system that negative flips are counted against. `rmlib.evaluation.
emb_file` reads and writes them as an EMB.npz file. Every problem is one RmlibError that
names the array and what to do.

Explained in the book: book/evaluator, book/own_upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rmlib import RmlibError
from rmlib.evaluation.retrieval import Protocol
from rmlib.outputs import save_npz


@dataclass(frozen=True)
class SystemPair:
    """The old and the new retrieval system over one gallery, with the labels that define
    relevance (validated when made)."""

    old_query: np.ndarray
    old_gallery: np.ndarray
    new_query: np.ndarray
    new_gallery: np.ndarray
    query_labels: np.ndarray
    gallery_labels: np.ndarray | None = None
    query_cams: np.ndarray | None = None
    gallery_cams: np.ndarray | None = None
    reference_query: np.ndarray | None = None
    reference_gallery: np.ndarray | None = None  # the deployed old gallery (negative flips)

    def __post_init__(self) -> None:
        validate(self)

    def reference_side(self) -> tuple[np.ndarray, np.ndarray]:
        """The deployed old system that negative flips are counted against: (queries,
        gallery), by default the file's own old system."""
        query = self.reference_query if self.reference_query is not None else self.old_query
        gallery = self.reference_gallery if self.reference_gallery is not None \
            else self.old_gallery
        return query, gallery

    @property
    def leave_one_out(self) -> bool:
        return self.gallery_labels is None

    def protocol(self) -> Protocol:
        """The protocol these arrays imply: leave-one-out, camera, or plain."""
        if self.leave_one_out:
            return Protocol.leave_one_out(self.query_labels)
        if self.query_cams is not None:
            return Protocol.camera(self.query_labels, self.gallery_labels, self.query_cams,
                                   self.gallery_cams)
        return Protocol(self.query_labels, self.gallery_labels)

    def save(self, path: Path | str) -> Path:
        return save_npz(path, {k: v for k, v in self.__dict__.items() if v is not None})


FLOAT32_MAX = float(np.finfo(np.float32).max)


def embedding_array(name: str, a: np.ndarray) -> np.ndarray:
    """A validated (items x dimensions) embedding array: real, finite, within float32.

    float64 (and integer) input stays float64, so that distances can be computed before
    anything is rounded to float32 (`rmlib.evaluation.retrieval.EuclideanSystem`); other floats
    become float32.
    """
    a = np.asarray(a)
    if a.dtype.kind == "c":
        raise RmlibError(f"{name} holds complex numbers (dtype {a.dtype}); embeddings are real: "
                         "store the real and imaginary parts side by side as real columns")
    if a.dtype.kind not in "fiu":
        raise RmlibError(f"{name} must hold real numbers, got dtype {a.dtype}; store the "
                         "embeddings as a float array")
    if a.ndim != 2:
        raise RmlibError(f"{name} must be 2-D (items x dimensions), got shape {a.shape}")
    if a.shape[0] == 0:
        raise RmlibError(f"{name} is empty: it needs at least one row")
    if a.shape[1] == 0:
        raise RmlibError(f"{name} has width 0 (shape {a.shape}): an embedding needs at least "
                         "one dimension")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        rows = int((~np.isfinite(a)).any(1).sum())
        raise RmlibError(f"{name} has NaN or inf in {rows} row(s); re-extract those embeddings")
    largest = float(np.abs(a).max())
    if largest > FLOAT32_MAX:
        raise RmlibError(f"{name} holds values up to {largest:.1e}, beyond float32's "
                         f"{FLOAT32_MAX:.1e}; divide all arrays by one common factor")
    wide = a.dtype.kind in "iu" or a.dtype.itemsize > 4
    return a.astype(np.float64 if wide else np.float32, copy=False)


def _ints(name: str, a: np.ndarray, length: int, what: str) -> np.ndarray:
    if a.ndim != 1 or len(a) != length:
        raise RmlibError(f"{name} has shape {a.shape}; expected ({length},), one per {what}")
    if not np.issubdtype(a.dtype, np.integer):
        raise RmlibError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def validate(arrays: SystemPair) -> None:
    """Check shapes, dtypes and values; normalise dtypes in place (float32, int64)."""
    set_ = object.__setattr__
    for name in ("old_query", "old_gallery", "new_query", "new_gallery", "reference_query",
                 "reference_gallery"):
        value = getattr(arrays, name)
        if value is not None:
            set_(arrays, name, embedding_array(name, value))
    q, n = len(arrays.old_query), len(arrays.old_gallery)
    pairs = [("new_query", arrays.new_query, q, "old_query"),
             ("new_gallery", arrays.new_gallery, n, "old_gallery")]
    for name, value, rows, other in pairs:
        if len(value) != rows:
            raise RmlibError(f"{name} has {len(value)} rows but {other} has {rows}; "
                             "both systems must embed the same items in the same order")
    dims = [("old_gallery", arrays.old_gallery, "old_query", arrays.old_query),
            ("new_gallery", arrays.new_gallery, "new_query", arrays.new_query)]
    if arrays.reference_gallery is not None:
        if arrays.reference_query is None:
            raise RmlibError("reference_gallery is given without reference_query; give both "
                             "(the deployed old system's queries and gallery) or neither")
        if len(arrays.reference_gallery) != n:
            raise RmlibError(f"reference_gallery has {len(arrays.reference_gallery)} rows; "
                             f"expected {n}, one per gallery item")
    if arrays.reference_query is not None:
        ref_name = "old_gallery" if arrays.reference_gallery is None else "reference_gallery"
        dims.append(("reference_query", arrays.reference_query, ref_name,
                     arrays.reference_side()[1]))
        if len(arrays.reference_query) != q:
            raise RmlibError(f"reference_query has {len(arrays.reference_query)} rows; "
                             f"expected {q}, one per query")
    for a_name, a, b_name, b in dims:
        if a.shape[1] != b.shape[1]:
            raise RmlibError(f"{a_name} has dimension {a.shape[1]} but {b_name} has {b.shape[1]}; "
                             "a query and the gallery it searches must come from one model")
    set_(arrays, "query_labels", _ints("query_labels", np.asarray(arrays.query_labels), q, "query"))
    if arrays.gallery_labels is None:
        if n != q:
            raise RmlibError("without gallery_labels the gallery is the query set (leave-one-out), "
                             f"but there are {q} queries and {n} gallery rows; add gallery_labels")
        if arrays.query_cams is not None or arrays.gallery_cams is not None:
            raise RmlibError("query_cams/gallery_cams need gallery_labels (camera protocol)")
    else:
        set_(arrays, "gallery_labels",
             _ints("gallery_labels", np.asarray(arrays.gallery_labels), n, "gallery row"))
    if (arrays.query_cams is None) != (arrays.gallery_cams is None):
        raise RmlibError("give both query_cams and gallery_cams, or neither")
    if arrays.query_cams is not None:
        set_(arrays, "query_cams", _ints("query_cams", np.asarray(arrays.query_cams), q, "query"))
        set_(arrays, "gallery_cams",
             _ints("gallery_cams", np.asarray(arrays.gallery_cams), n, "gallery row"))


def centred(pair: SystemPair, old_centre: np.ndarray, new_centre: np.ndarray) -> SystemPair:
    """The two systems with each one's embeddings moved by its own centre (the mean of its
    training embeddings) and L2-normalised again: a standard retrieval step that takes
    away the direction every embedding of a model shares, so that a model whose items sit
    in a narrow cone no longer has short distances between any two of them. Nothing is
    fitted and no test item is used; negative flips stay counted against the deployed
    (raw) old system."""
    for side, centre in (("old", old_centre), ("new", new_centre)):
        width = getattr(pair, f"{side}_gallery").shape[1]
        if np.shape(centre) != (width,):
            raise RmlibError(f"the {side} system's centre has shape {np.shape(centre)}, its "
                             f"embeddings {width} dimensions: centre each system on its own "
                             "embeddings of training items")

    def unit(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
        y = np.asarray(x) - np.asarray(centre, dtype=np.asarray(x).dtype)  # float64 stays
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

    reference_query, reference_gallery = pair.reference_side()
    return replace(pair, old_query=unit(pair.old_query, old_centre),
                   old_gallery=unit(pair.old_gallery, old_centre),
                   new_query=unit(pair.new_query, new_centre),
                   new_gallery=unit(pair.new_gallery, new_centre),
                   reference_query=reference_query, reference_gallery=reference_gallery)

