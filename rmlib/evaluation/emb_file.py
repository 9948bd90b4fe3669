"""The evaluation file (EMB.npz) that `python -m rmlib backfill` reads: a `SystemPair`
(`rmlib.evaluation.systems`) stored as named arrays, and the checks of the file itself.

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
from pathlib import Path

import numpy as np

from rmlib import RmlibError
from rmlib.evaluation.systems import SystemPair, centred, embedding_array

REQUIRED = ("old_query", "old_gallery", "new_query", "new_gallery", "query_labels")
OPTIONAL = ("gallery_labels", "query_cams", "gallery_cams", "reference_query",
            "reference_gallery")


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


def load_backfill_arrays(path: Path | str) -> SystemPair:
    """Read and validate an evaluation file; every failure is one clear RmlibError."""
    return SystemPair(**load_npz(path, REQUIRED, OPTIONAL))


def training_means(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Each system's mean over its training embeddings, from a TRAIN.npz (`old`, `new`,
    `labels`: what `fit` reads) or a TRAIN_EMB.npz (an evaluation file of training items:
    the means of its galleries)."""
    path = readable_file(path, "a TRAIN.npz or TRAIN_EMB.npz of the two systems' "
                               "embeddings of training items")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        names = set()  # not an archive: load_backfill_arrays says so, in one line
    if {"old.npy", "new.npy"} <= names:
        found = load_npz(path, ("old", "new"), ("labels",))
        return (embedding_array("old", found["old"]).mean(0),
                embedding_array("new", found["new"]).mean(0))
    train = load_backfill_arrays(path)
    return train.old_gallery.mean(0), train.new_gallery.mean(0)


def centred_on(arrays: SystemPair, train_path: Path | str) -> SystemPair:
    """`arrays` with each system centred on its own mean over the training file
    (`training_means`; never the evaluation set) and L2-normalised: the step that takes
    away the direction all of a model's embeddings share."""
    return centred(arrays, *training_means(train_path))


BackfillArrays = SystemPair  # its name before rmlib 0.2, kept for code that imports it
