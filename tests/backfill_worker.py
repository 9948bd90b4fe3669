"""A backfill job to be killed: `python tests/backfill_worker.py DB STAGE`.

It creates a Milvus-backed live index of `GALLERY` items in DB (or resumes it with
`--resume`), then backfills them in batches of `BATCH` in a fixed order. In the second
batch it stops at STAGE, prints PAUSED and waits to be killed:

- insert: the new part holds part of the batch (one insert request of several is done);
- inserted: the whole batch is in the new part (and the journal says so), nothing is
  deleted from the old part yet;
- delete: part of the batch is deleted from the old part.

Requests are 40 rows, so a batch of 100 takes three of each.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import rmlib.serving.parts as parts
from rmlib.serving.index import OnlineBackfillIndex

GALLERY, BATCH, OLD_DIM, NEW_DIM = 500, 100, 8, 12


def systems(seed: int = 0):
    """The worker's gallery: old and new embeddings and the backfill order."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(GALLERY, OLD_DIM)).astype("f4"),
            rng.normal(size=(GALLERY, NEW_DIM)).astype("f4"), rng.permutation(GALLERY))


def pause_at(index: OnlineBackfillIndex, stage: str) -> None:
    """Stop in the second batch at `stage`, by wrapping the database client's requests."""
    client = index._parts._client
    calls = {"insert": 0, "delete": 0}

    def wrap(method: str, stop_at: int, before: bool = False):
        original = getattr(client, method)

        def request(*args, **kwargs):
            calls[method] += 1
            if before and calls[method] == stop_at:
                pause()
            out = original(*args, **kwargs)
            if not before and calls[method] == stop_at:
                pause()
            return out
        setattr(client, method, request)

    per_batch = -(-BATCH // parts.MILVUS_REQUEST_ROWS)  # requests per batch
    if stage == "insert":  # after the first insert request of the second batch
        wrap("insert", per_batch + 1)
    elif stage == "inserted":  # before its first delete request
        wrap("delete", per_batch + 1, before=True)
    elif stage == "delete":  # after its first delete request
        wrap("delete", per_batch + 1)


def pause() -> None:
    print("PAUSED", flush=True)
    time.sleep(600)


def main() -> None:
    db, stage = sys.argv[1], sys.argv[2]
    parts.MILVUS_REQUEST_ROWS = 40
    old, new, order = systems()
    if "--resume" in sys.argv:
        index = OnlineBackfillIndex.reopen(db)
    else:
        index = OnlineBackfillIndex(old, NEW_DIM, backend="milvus", uri=db)
    pause_at(index, stage)
    while index.num_new < GALLERY:
        batch = index.next_batch(order, BATCH)
        index.backfill(batch, new[batch])
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
