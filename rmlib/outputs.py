"""Output files that are never lost or half-written, and output paths checked before any work.

Every file rmlib writes goes first to a temporary file in the destination's folder, is
flushed to disk, and is then renamed onto the destination (`os.replace`, atomic within one
file system). A full disk, an exception or an interrupt leaves the previous file intact and
removes the temporary one; only a hard kill (SIGKILL, power loss) can leave a hidden
`.NAME.*.tmp` beside it, never a truncated NAME.

Paths are checked up front (`check_outputs`) so that a typo in `--json` does not throw
away minutes of fitting: the folder must be creatable and writable, the name must be a
new path or a regular file (a folder, a symbolic link, a device, a FIFO or a socket would be
replaced by the rename, or never receive the data), a figure needs an extension matplotlib
can write, and no output may be an input. The check creates nothing: a run that fails
leaves no empty folders behind.

Explained in the book: book/own_upgrade.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rmlib import RmlibError

T = TypeVar("T")


def _default_mode(path: Path) -> int:
    """The permissions the file would have had if written in place."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it onto `path`.

    If `write` raises (or is interrupted), `path` keeps its previous content and the
    temporary file is removed. Returns `path`.
    """
    path = Path(path)
    problem = _not_a_file(path)
    if problem:
        raise RmlibError(f"will not write {path}: it is {problem}; give the path of a regular "
                         "file or a new one")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it the real file
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(path))
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a lost mount: one line, and nothing lost
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        kept = "its previous content is unchanged" if path.exists() else "nothing was written"
        raise RmlibError(f"could not write {path} ({exc.strerror or exc}); {kept}") from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path | str, obj: Any) -> Path:
    """JSON with 2-space indents; tuples become lists."""
    return write_text(path, json.dumps(obj, indent=2, default=list))


def save_torch(path: Path | str, obj: Any) -> Path:
    """torch.save to `path`, atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_npy(path: Path | str, array: np.ndarray) -> Path:
    """np.save to exactly `path` (given a name, np.save would append .npy)."""
    return atomic_write(path, lambda tmp: _with_file(tmp, lambda f: np.save(f, array)))


def save_npz(path: Path | str, arrays: Mapping[str, np.ndarray]) -> Path:
    """np.savez to exactly `path` (given a name, np.savez would append .npz)."""
    return atomic_write(path, lambda tmp: _with_file(tmp, lambda f: np.savez(f, **arrays)))


def _with_file(path: Path, write: Callable[[Any], Any]) -> None:
    with open(path, "wb") as f:
        write(f)


def cached(path: Path, compute: Callable[[], T], save: Callable[[Path, T], Any],
           load: Callable[[Path], T]) -> T:
    """`load(path)` if it exists; else `compute()`, stored with `save(path, value)` (one of
    the atomic savers here): the one disk cache of rmlib's expensive steps."""
    if path.exists():
        return load(path)
    value = compute()
    save(path, value)
    return value


def _figure_formats() -> set[str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def save_figure(fig, path: Path | str, **kwargs) -> Path:
    """`fig.savefig` through a temporary file; the format comes from the extension."""
    fmt = Path(path).suffix.lstrip(".").lower()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


_TEMPORARY_EXTRA = len(".") + len(".12345678") + len(".tmp")  # atomic_write's mkstemp name


def name_max(folder: Path | str) -> int:
    """The longest file name, in bytes, that `folder` (or, while it does not exist, its
    nearest existing ancestor) takes."""
    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # what the common file systems take


def _not_a_file(path: Path) -> str | None:
    """What `path` is, if it exists and is not a regular file (None: a file or a new path)."""
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # new (the folder check says the rest)
        return None
    except OSError as exc:  # a loop of links, a name too long, a path under a file
        return f"not reachable ({exc.strerror or exc})"
    if stat.S_ISLNK(mode):
        return "a symbolic link (the new file would replace the link, not write through it)"
    if stat.S_ISDIR(mode):
        return "a folder"
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return None


def check_output(path: Path | str, option: str, inputs: Iterable[Path | str] = (),
                 figure: bool = False) -> Path:
    """Fail now, with one line, if `path` could not be written at the end of the work.

    Probes that a file can be made in the folder of `path` (or, if that folder does not
    exist yet, in its nearest existing ancestor) without creating anything. `inputs` are
    files the command reads: an output that is one of them would destroy it.
    """
    path = Path(path)
    problem = _not_a_file(path)
    if problem == "a folder":
        raise RmlibError(f"{option} {path} is a folder; give a file name inside it")
    if problem:
        raise RmlibError(f"{option} {path} is {problem}; give the path of a regular file or "
                         "a new one")
    longest = name_max(path.parent) - _TEMPORARY_EXTRA
    if len(os.fsencode(path.name)) > longest:
        raise RmlibError(f"{option}: the file name is {len(os.fsencode(path.name))} bytes; give "
                         f"one of at most {longest} (it is first written under a longer "
                         "temporary name)")
    if figure:
        fmt = path.suffix.lstrip(".").lower()
        known = sorted(_figure_formats())
        if fmt not in known:
            raise RmlibError(f"{option} {path}: cannot save a figure as {fmt or 'no extension'!r}"
                             f"; end the name with one of .{', .'.join(known)}")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise RmlibError(f"{option} {path} is the input file {source}; writing it would "
                             "destroy the input: choose another name")
    check_folder(path.parent, f"{option} {path}", create=False)
    return path


def check_folder(folder: Path | str, what: str, create: bool = True) -> Path:
    """Fail now, with one line, unless `folder` is (or can be made) a writable folder.
    `create`: make it now (rmlib's own caches); otherwise only probe its nearest existing
    ancestor (a user's output path, made only when the output is written). `what` names
    it in the message."""
    folder = Path(folder)
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
            raise RmlibError(f"{what}: {ancestor} is a link to nowhere; choose a path inside "
                             "a folder")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        kind = "a file" if ancestor.is_file() else "not a file"
        raise RmlibError(f"{what}: {ancestor} is {kind}, not a folder; choose a path "
                         "inside a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            ancestor = folder
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise RmlibError(f"{what}: cannot write in {ancestor} ({exc.strerror or exc}); "
                         "choose a writable folder") from exc
    return folder


def check_outputs(outputs: Mapping[str, Path | str | None], inputs: Iterable[Path | str] = (),
                  figures: Iterable[str] = ()) -> None:
    """`check_output` for each given option (None: not asked for), and no two the same."""
    inputs, figures = list(inputs), set(figures)
    given = {option: Path(p) for option, p in outputs.items() if p is not None}
    for option, path in given.items():
        check_output(path, option, inputs, figure=option in figures)
    seen: dict[Path, str] = {}
    for option, path in given.items():
        key = path.resolve()
        if key in seen:
            raise RmlibError(f"{seen[key]} and {option} are the same file {path}; give each "
                             "its own name")
        seen[key] = option
