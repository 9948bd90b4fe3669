"""A backfill job to be killed: `python scripts/backfill_worker.py DB STAGE`.

It creates a Milvus-backed live index of `GALLERY` items in DB (or resumes it, as
`python -m rmlib live` does: reopened when it was created, created again when its
creation was interrupted), then backfills them in batches of `BATCH` in a fixed order.
At STAGE it prints PAUSED and waits to be killed; in the second batch unless said:

- create: while the old gallery loads (3 of its 13 insert requests are done);
- begun: the journal holds the batch, nothing is inserted yet;
- insert: the new part holds part of the batch (one insert request of several is done);
- inserted: the whole batch is in the new part (and the journal says so), nothing is
  deleted from the old part yet;
- delete: part of the batch is deleted from the old part;
- deleted: every delete is done, the journal still holds the batch;
- upsert: re-embedding the first batch (already new), after one upsert request.

Requests are 40 rows, so a batch of 100 takes three of each.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import rmlib.serving.parts as parts
from rmlib.serving.index import OnlineBackfillIndex, creation_state

GALLERY, BATCH, OLD_DIM, NEW_DIM = 500, 100, 8, 12


def systems(seed: int = 0):
    """The worker's gallery: old and new embeddings and the backfill order."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(GALLERY, OLD_DIM)).astype("f4"),
            rng.normal(size=(GALLERY, NEW_DIM)).astype("f4"), rng.permutation(GALLERY))


def pause_at(index: OnlineBackfillIndex, stage: str) -> None:
    """Stop in the second batch at `stage`, by wrapping the database client's requests."""
    client = index._parts._client
    calls = {"insert": 0, "delete": 0, "upsert": 0}

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
    if stage == "begun":  # the journal holds the second batch, nothing is inserted yet
        wrap("insert", per_batch + 1, before=True)
    elif stage == "insert":  # after the first insert request of the second batch
        wrap("insert", per_batch + 1)
    elif stage == "inserted":  # before its first delete request
        wrap("delete", per_batch + 1, before=True)
    elif stage == "delete":  # after its first delete request
        wrap("delete", per_batch + 1)
    elif stage == "deleted":  # after its last delete request, before the journal's "done"
        wrap("delete", 2 * per_batch)
    elif stage == "upsert":  # after the first upsert request of a re-embedding of batch 1
        wrap("upsert", 1)


def pause() -> None:
    print("PAUSED", flush=True)
    time.sleep(600)


def main() -> None:
    db, stage = sys.argv[1], sys.argv[2]  # --resume: ignored, resuming is automatic
    parts.MILVUS_REQUEST_ROWS = 40
    old, new, order = systems()
    if stage == "create":  # killed while the old gallery loads (request 3 of 13)
        parts.MilvusParts.put = pausing_put(parts.MilvusParts.put)
    state = creation_state(db)
    if state == "complete":
        index = OnlineBackfillIndex.reopen(db)
    else:
        index = OnlineBackfillIndex(old, NEW_DIM, backend="milvus", uri=db,
                                    overwrite=state is not None)
    pause_at(index, stage)
    while index.num_new < GALLERY:
        batch = index.next_batch(order, BATCH)
        index.backfill(batch, new[batch])
        if stage == "upsert" and index.num_new == BATCH:  # re-embed the first batch
            index.backfill(batch, new[batch] + 1.0)
    index.close()
    print("DONE", flush=True)


def pausing_put(put):
    def put_then_pause(self, part, ids, vectors, replace):
        rows = parts.MILVUS_REQUEST_ROWS
        put(self, part, ids[:3 * rows], vectors[:3 * rows], replace)
        pause()
    return put_then_pause


if __name__ == "__main__":
    main()
