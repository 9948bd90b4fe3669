"""The evaluation file (EMB.npz) that `python -m rmlib backfill` reads, and its checks.

Required float arrays old_query (Q, d_old), old_gallery (N, d_old), new_query (Q, d_new),
new_gallery (N, d_new) and int query_labels (Q,). Optional: gallery_labels (N,) (absent:
leave-one-out, the gallery is the query set and query i is gallery item i); query_cams and
gallery_cams (present: Market-1501's camera protocol); reference_query (Q, d_ref), the
deployed old model's query embedding that defines negative flips (default old_query), and
reference_gallery (N, d_ref), the deployed old gallery it searches (default old_gallery:
give it when old_gallery is not what the old system served, e.g. an upgraded h(phi_old)).
Every problem is reported as one line that names the array and what to do.

Explained in the book: book/own_upgrade.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmlib import RmlibError
from rmlib.evaluation.retrieval import Protocol
from rmlib.outputs import save_npz

REQUIRED = ("old_query", "old_gallery", "new_query", "new_gallery", "query_labels")
OPTIONAL = ("gallery_labels", "query_cams", "gallery_cams", "reference_query",
            "reference_gallery")


@dataclass(frozen=True)
class BackfillArrays:
    """Two retrieval systems over one gallery, with the labels that define relevance."""

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


def validate(arrays: BackfillArrays) -> None:
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


def readable_file(path: Path | str, kind: str) -> Path:
    """`path` if it is a regular file this process may read; otherwise one RmlibError that
    says what it is instead (missing, a folder, a FIFO or device, a loop of links,
    unreadable). `kind` names what was expected, e.g. "an .npz file"."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows links: a link to a file is a file
    except (FileNotFoundError, NotADirectoryError):
        raise RmlibError(f"{path} does not exist; give the path of {kind}") from None
    except OSError as exc:  # a loop of links, a name too long
        raise RmlibError(f"{path} cannot be opened ({exc.strerror or exc}); give the path of "
                         f"{kind}") from None
    if stat.S_ISDIR(mode):
        raise RmlibError(f"{path} is a folder; give the path of {kind}")
    if not stat.S_ISREG(mode):
        raise RmlibError(f"{path} is not a regular file (a FIFO, socket or device); give the "
                         f"path of {kind}")
    if not os.access(path, os.R_OK):
        raise RmlibError(f"{path} is not readable (permission denied); give the path of {kind} "
                         "this user may read")
    return path


def _declared_too_large(archive: np.lib.npyio.NpzFile, key: str) -> str | None:
    """Whether member `key` claims more data than it holds (a damaged or crafted header
    would otherwise make numpy allocate the claimed size first)."""
    name = key if key in archive.zip.namelist() else f"{key}.npy"
    info = archive.zip.getinfo(name)
    with archive.zip.open(name) as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return None  # numpy reads (and checks) other versions itself
        shape, _, dtype = read_header(f)
        payload = info.file_size - f.tell()
    if dtype.hasobject:
        return None  # refused by allow_pickle=False when read
    need = math.prod(shape) * dtype.itemsize
    if need > payload:
        return (f"its header claims shape {shape} of {dtype} ({need:,} bytes) but it holds "
                f"{payload:,} bytes")
    return None


def load_npz(path: Path | str, required: tuple[str, ...], optional: tuple[str, ...] = ()
             ) -> dict[str, np.ndarray]:
    """The arrays of an .npz file that must hold `required` and may hold `optional`.

    Any other array is an error: a misspelt optional array (`gallery_label`) would
    otherwise be ignored and silently change the protocol. Every problem is one RmlibError.
    """
    path = readable_file(path, "an .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise RmlibError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez"
                         ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise RmlibError(f"{path} holds a single array (.npy), not an .npz archive of named "
                         f"arrays; write it with numpy.savez(path, {', '.join(required)})")
    with archive:
        found = {}
        for key in archive.files:
            try:
                too_large = _declared_too_large(archive, key)
                if too_large:
                    raise RmlibError(f"{path}: array {key!r} is damaged: {too_large}; write the "
                                     "file again with numpy.savez")
                found[key] = archive[key]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error,
                    MemoryError) as exc:
                raise RmlibError(f"{path}: array {key!r} cannot be read ({exc}); store numbers, "
                                 "not Python objects") from exc
    missing = [k for k in required if k not in found]
    if missing:
        raise RmlibError(f"{path} lacks {', '.join(missing)}; it needs {', '.join(required)}")
    unknown = sorted(set(found) - set(required) - set(optional))
    if unknown:
        raise RmlibError(f"{path} holds unknown array(s) {', '.join(unknown)}; accepted: "
                         f"{', '.join(required + optional)} (rename or remove the others)")
    return found


def load_backfill_arrays(path: Path | str) -> BackfillArrays:
    """Read and validate an evaluation file; every failure is one clear RmlibError."""
    return BackfillArrays(**load_npz(path, REQUIRED, OPTIONAL))
