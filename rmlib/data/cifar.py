"""CIFAR-100 in the official python layout, read from its pickles, and the old/new protocol.

The pickles are read directly (shapes and counts checked, not md5): copies whose
placeholder file names differ from the official tarball are still the official pixels,
labels, split and order. torchvision is used only to download the archive when the folder
is missing and a network is there (`fetch_cifar100`: md5-checked, unpacked atomically).

Explained in the book: book/data_protocol.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmlib import RmlibError

CIFAR100_DIRNAME = "cifar-100-python"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = 100
OLD_CLASSES = 50  # the old model sees fine classes 0-49
_SPLIT_SIZES = {"train": 50_000, "test": 10_000}


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, 3, H, W) in memory with int64 labels: what the training loop eats."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


def cifar100_dir(root: Path | str) -> Path:
    return Path(root) / CIFAR100_DIRNAME


def fetch_cifar100(root: Path | str, url: str | None = None, md5: str | None = None) -> Path:
    """Download and unpack CIFAR-100 into `root`/cifar-100-python, once and atomically.

    The archive is checked against its published md5 (torchvision's download, with a
    progress bar) and unpacked in a temporary folder beside the destination, which is
    renamed into place only when complete: an interrupted or failed fetch leaves nothing
    that looks like the data, nor the folders it made for it. `url`/`md5` default to the
    official archive's.
    """
    import shutil
    import socket
    import tempfile

    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root)
    folder = cifar100_dir(root)
    if folder.is_dir():
        return folder
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".cifar-100-fetch.", dir=root))
    except OSError as exc:
        _remove_empty(made)
        raise RmlibError(f"cannot download CIFAR-100 into {root} ({exc.strerror or exc}); set "
                         "RMLIB_DATA to a writable folder (or one that holds "
                         "cifar-100-python/)") from exc
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # an unreachable host fails in a minute, not never
    try:
        download_and_extract_archive(url or CIFAR100.url, download_root=str(scratch),
                                     filename=CIFAR100.filename, md5=md5 or CIFAR100.tgz_md5)
        unpacked = scratch / CIFAR100_DIRNAME
        if not (unpacked / "train").is_file() or not (unpacked / "test").is_file():
            raise RmlibError(f"the archive from {url or CIFAR100.url} holds no "
                             f"{CIFAR100_DIRNAME}/train and test")
        unpacked.rename(folder)
    except RmlibError:
        raise
    except Exception as exc:  # no network, a bad checksum, a full disk: one line
        raise RmlibError(
            f"CIFAR-100 is not at {folder} and could not be downloaded ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'no detail'}); "
            "set RMLIB_DATA to a folder that holds cifar-100-python/") from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)
        shutil.rmtree(scratch, ignore_errors=True)
        if not folder.is_dir():
            _remove_empty(made)
    return folder


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: what a failed fetch made."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


class _ForbiddenObject(pickle.UnpicklingError):
    pass


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-100 format holds: dicts, lists, strings, numbers and
    numpy arrays. A plain unpickler calls any function a crafted file names."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _ForbiddenObject(f"it asks for {module}.{name}")
        return super().find_class(module, name)


def load_cifar100(split: str, root: Path | str, download: bool = True) -> ImageSet:
    """Read the `train` or `test` split; download only if the folder is missing (and allowed)."""
    if split not in _SPLIT_SIZES:
        raise RmlibError(f"CIFAR-100 split {split!r} does not exist; use 'train' or 'test'")
    folder = cifar100_dir(root)
    if not folder.is_dir():
        if not download:
            raise RmlibError(
                f"CIFAR-100 is not at {folder}; set RMLIB_DATA to a folder that holds "
                "cifar-100-python/ (or allow the download with RMLIB_DOWNLOAD=1)"
            )
        fetch_cifar100(root)
    path = folder / split
    if not path.is_file():
        raise RmlibError(f"{path} is missing: the CIFAR-100 folder is incomplete; re-download it")
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        data = np.asarray(entry["data"])
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    except _ForbiddenObject as exc:
        raise RmlibError(f"{path} is not a plain CIFAR-100 pickle: {exc}; refusing to load "
                         "it (unpickling could run code): re-download it") from exc
    except Exception as exc:
        raise RmlibError(
            f"{path} is not a CIFAR-100 python pickle ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    n = _SPLIT_SIZES[split]
    if data.dtype != np.uint8 or data.shape != (n, 3072) or labels.shape != (n,):
        raise RmlibError(
            f"{path} holds data {data.dtype}{data.shape} and {labels.shape[0]} labels; "
            f"expected uint8({n}, 3072) and {n} labels: the file is damaged, re-download it"
        )
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if labels.min() < 0 or len(counts) != NUM_CLASSES or (counts != n // NUM_CLASSES).any():
        per_class = n // NUM_CLASSES
        raise RmlibError(f"{path}: fine labels are not {per_class} per class 0-99; re-download")
    return ImageSet(data.reshape(n, 3, 32, 32), labels)


def old_class_mask(labels: np.ndarray, n_old_classes: int = OLD_CLASSES) -> np.ndarray:
    """The old model's training items: fine classes 0 .. n_old_classes-1."""
    return np.asarray(labels) < n_old_classes


def train_val_split(
    labels: np.ndarray, per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified hold-out of `per_class` items per class, for choosing hyper-parameters.

    A class with too few items gives what it can spare and keeps at least one for fitting.
    Returns sorted (fit_index, val_index). The test set is never used for choices.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(rng.choice(idx, min(per_class, len(idx) - 1), replace=False))
    val_index = np.sort(np.concatenate(val))
    fit_index = np.setdiff1d(np.arange(len(labels)), val_index)
    return fit_index, val_index
