"""The backfill journal: a small write-ahead note that lets a killed backfill finish cleanly.

A batch moves items between two collections of a vector database in two steps (insert
into the new part, then delete from the old part), and Milvus has no transaction across
two collections.
The journal records, before anything is touched, which ids the batch moves; then that
the insert is complete; and clears the note when the batch is done. After a crash,
`pending()` tells the restarted process which ids may be half-moved: every one of them
that reached the new part is deleted from the old part, every other one is still whole
in the old part (deletes start only after the insert is complete). So no item is lost
and none is in both parts, whatever instant the process died at.

The file holds a header line (the gallery it belongs to) and at most one batch, so it
stays small however long the backfill runs. Every change is written to a temporary file,
synced and renamed over the journal: a reader sees the old or the new state, never half
a line.

Explained in the book: book/serving.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np

from rmlib import RmlibError

VERSION = 1


def _sync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HEADER = {"name": str, "num_items": int, "id_sum": int, "old_dim": int, "new_dim": int,
           "complete": bool}


def _problem(records: list) -> str | None:
    """What makes these records no journal, or None: a journal edited or written by
    something else is refused, not half-read."""
    if not records or not all(isinstance(r, dict) for r in records):
        return "every line must be a JSON object"
    header = records[0]
    if type(header.get("journal")) is not int or header["journal"] != VERSION:
        return f"its first line is no version-{VERSION} header"
    for key, kind in _HEADER.items():
        if type(header.get(key)) is not kind:
            return f"its header's {key!r} is not of type {kind.__name__}"
    if not isinstance(header.get("meta", {}), dict):
        return "its header's 'meta' is not an object"
    if len(records) > 3:
        return "it holds more than one batch"
    begin = records[1].get("begin") if len(records) > 1 else []
    if not isinstance(begin, list) or not all(type(i) is int and i >= 0 for i in begin):
        return "its batch's 'begin' is not a list of ids"
    inserted = records[2] if len(records) == 3 else {"inserted": True}
    if list(inserted) != ["inserted"] or inserted["inserted"] is not True:
        return "its third line is not {\"inserted\": true}"
    return None


def _same_file(fd: int, path: Path) -> bool:
    """Whether an open file is still the one at `path` (not removed and made again)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class BackfillJournal:
    """The journal of one live index: its header and the batch in flight, if any."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: int | None = None
        self._written: list[dict] | None = None  # what this writer last wrote (no re-reads)

    # --- one writer ---------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the journal's lock file while the index is open: a second backfill job on
        the same index would overwrite this one's batch. The kernel drops the lock of a
        killed process, so a restarted job takes it again."""
        lock = Path(f"{self.path}.lock")
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RmlibError(f"cannot create the lock file {lock} ({e.strerror}); choose "
                                 "a journal path in a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RmlibError(f"another process has this live index open (it holds "
                                 f"{lock}); stop it, or wait for it to close") from None
            if _same_file(fd, lock):
                break
            os.close(fd)  # its holder removed it before we locked it: lock the new one
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            if not self.path.exists():  # nothing was created: leave no lock file behind
                Path(f"{self.path}.lock").unlink(missing_ok=True)
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    # --- writing ---------------------------------------------------------------------------
    def _replace(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _sync_dir(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RmlibError(f"cannot write the backfill journal {self.path} ({e.strerror}); "
                             "check that it names a file in a writable folder with space left"
                             ) from None
        self._written = records

    def start(self, header: dict) -> None:
        """A new index: its header, marked incomplete until `created()`."""
        self._replace([{"journal": VERSION, **header, "complete": False}])

    def created(self) -> None:
        """Every item of the gallery is in the old part."""
        self._replace([self.header() | {"complete": True}])

    def begin(self, ids: np.ndarray) -> None:
        """Before a batch touches the database: the ids it moves."""
        self._replace([self.header(), {"begin": np.asarray(ids).tolist()}])

    def inserted(self) -> None:
        """Every id of the batch is in the new part; deletes from the old part may start."""
        self._replace(self._records()[:2] + [{"inserted": True}])

    def done(self) -> None:
        """The batch is complete (or recovered)."""
        self._replace([self.header()])

    # --- reading ---------------------------------------------------------------------------
    def _records(self) -> list[dict]:
        if self._written is not None:
            return self._written
        if self.path.is_dir():
            raise RmlibError(f"the journal {self.path} is a folder; pass journal=PATH of a file")
        if not self.path.is_file():
            raise RmlibError(f"no backfill journal at {self.path}: the live index was never "
                             "created there, or its journal was moved; pass journal=PATH")
        try:
            records = [json.loads(line) for line in self.path.read_text().splitlines()]
            problem = _problem(records)
        except OSError as e:
            raise RmlibError(f"cannot read the backfill journal {self.path} ({e.strerror}); "
                             "check its permissions") from None
        except ValueError as e:  # not UTF-8, or not JSON
            problem = str(e)
        if problem:
            raise RmlibError(f"{self.path} is not a backfill journal ({problem}); it is written "
                             "only by rmlib.serving: restore it, or create the index again "
                             "(overwrite=True)")
        return records

    def header(self) -> dict:
        return self._records()[0]

    def pending(self) -> tuple[np.ndarray, bool] | None:
        """The ids of an unfinished batch and whether its insert completed, or None."""
        records = self._records()
        if len(records) < 2:
            return None
        ids = np.asarray(records[1]["begin"], dtype=np.int64)
        return ids, len(records) == 3
