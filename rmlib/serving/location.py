"""Where a Milvus-backed live index lives: its name, its database and its journal.

All of it is checked before the first file is written (a lock, a journal, a Milvus Lite
database), so a mistyped name or path is one line and leaves nothing behind.

Explained in the book: book/serving.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rmlib import RmlibError
from rmlib.outputs import name_max
from rmlib.serving.checks import check_name
from rmlib.serving.journal import BackfillJournal
from rmlib.serving.parts import Backend, DurableStore

DEFAULT_MILVUS_URI = "online_backfill.db"  # a Milvus Lite file in the working directory


def is_local(uri: str) -> bool:
    """A Milvus Lite file, as opposed to a server's URI."""
    return "://" not in uri and not uri.startswith("unix:")


def _check_folder(path: Path, what: str) -> None:
    """A file can be made at `path`: its folder exists and takes a new file of that name. A
    probe file (removed at once) tells, where permissions do not (for root, or in /proc)."""
    folder = path.parent
    if not folder.is_dir():
        raise RmlibError(f"the folder of {what} {path} does not exist or is not a folder; "
                         "create it, or choose another path")
    longest = name_max(folder)
    if len(os.fsencode(path.name)) > longest:
        raise RmlibError(f"the file name of {what} {path} is longer than the {longest} bytes "
                         "its folder takes; choose a shorter name, or another path")
    if path.is_dir():
        raise RmlibError(f"{what} {path} is a folder; name a file in it")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".rmlib-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RmlibError(f"cannot write in {folder}, the folder of {what} {path} "
                         f"({e.strerror}); choose a writable folder") from None


def journal_path(uri: str, name: str, journal: str | Path | None) -> Path:
    check_name(name)
    if journal is not None:
        return Path(journal)
    if not is_local(uri):
        raise RmlibError(f"a live index on the Milvus server {uri!r} needs journal=PATH, a "
                         "local file that survives the backfill process")
    return Path(f"{uri}.{name}.journal")


def check_location(uri: str, name: str, journal: str | Path | None,
                   local_files: bool = True) -> Path:
    """The journal's path, once the name, the URI and both files' folders are usable.
    `local_files`: the backend makes a local file of a uri that is not a URL (Milvus Lite)."""
    path = journal_path(uri, name, journal)
    if local_files and is_local(uri):
        if not uri.endswith(".db"):
            raise RmlibError(f"{uri!r} is neither a Milvus Lite file (a name ending in .db) nor "
                             "a Milvus server's URI (http://host:19530)")
        _check_folder(Path(uri), "the Milvus Lite file")
    _check_folder(path, "the journal")
    return path


def creation_state(uri: str = DEFAULT_MILVUS_URI, name: str = "gallery",
                   journal: str | Path | None = None) -> str | None:
    """Whether a Milvus-backed live index was created at `uri` under `name`: "complete"
    (reopen it), "incomplete" (its creation was interrupted: create it again), or None."""
    header = journal_header(uri, name, journal)
    return None if header is None else "complete" if header["complete"] else "incomplete"


def journal_header(uri: str, name: str, journal: str | Path | None) -> dict | None:
    """The journal header of the live index at `uri` under `name`, or None if it has none."""
    path = journal_path(str(uri), name, journal)
    if path.is_dir():
        raise RmlibError(f"the journal {path} is a folder; name a file in it")
    return BackfillJournal(path).header() if path.is_file() else None


def open_locked(journal: BackfillJournal, backend: Backend, uri: str, name: str, token: str,
                nprobe: int) -> DurableStore:
    """Take the journal's lock (one process at a time changes a live index), then connect
    to the durable `backend`."""
    journal.lock()
    try:
        return backend.connect(uri, name, token, nprobe)
    except BaseException:
        journal.unlock()
        raise
