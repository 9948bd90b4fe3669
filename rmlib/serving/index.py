"""Serving during a live backfill: one merged index that grows as items are re-embedded.

Two searchable parts over one gallery: the *old part* holds old-model embeddings of the
items not yet backfilled, the *new part* the new-model embeddings of those that are. A
backfill batch moves items (by id) from the old part to the new part; every item is in
exactly one part at all times. A query brings two embeddings from one backbone pass,
rho_new(q) for the new part and rho_rev(q) = psi(rho_new(q)) for the old part (or any two
query embeddings), and gets one merged top-k, ranked by distance with ties broken by id,
as the offline evaluator ranks them.

The parts live in faiss indexes in this process (`backend="faiss"`, the default), in
two collections of a Milvus database (`backend="milvus"`), or in any registered backend
(`rmlib.serving.parts.BACKENDS`). Exact (flat) search by default; `approximate=True` uses
IVF indexes, whose recall against exact search the benchmark reports.

A batch is two writes (insert into the new part, then delete from the old part), so a
search that runs between them would find a moving item in both parts; the index serves
each moving item from one part only (the old part until the insert is complete, the new
part after), and changes that rule only when no search is in flight. With Milvus, the
batch is also written ahead in a journal (`rmlib.serving.journal`): a process killed in
the middle of a batch is resumed by `OnlineBackfillIndex.reopen`, which finishes the
move of every item that reached the new part and leaves the rest whole in the old part.
Beside it: `checks` (its arguments), `location` (where it lives), `merge` (results, gate).

Explained in the book: book/serving.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from rmlib import RmlibError
from rmlib.arguments import count
from rmlib.evaluation.retrieval import (
    Protocol,
    QueryScores,
    ScoreAccumulator,
    query_chunks,
    relevant_slots,
)
from rmlib.serving.checks import (
    check_dims,
    check_meta,
    float_rows,
    gallery_rows,
    id_array,
    id_sum,
)
from rmlib.serving.journal import BackfillJournal
from rmlib.serving.location import (
    DEFAULT_MILVUS_URI,
    check_location,
    is_local,
    open_locked,
)
from rmlib.serving.location import creation_state as creation_state  # where callers find it
from rmlib.serving.merge import SearchGate
from rmlib.serving.merge import SearchResult as SearchResult  # where callers find them
from rmlib.serving.merge import float32_tolerance as float32_tolerance
from rmlib.serving.parts import DurableStore, backend_spec


class OnlineBackfillIndex:
    """A gallery during its backfill: an old part and a new part, searched as one.

    backend="faiss" keeps both parts in this process. backend="milvus" keeps them in the
    Milvus database at `uri` (default: a Milvus Lite file, `online_backfill.db`; a server
    by "http://host:19530"), as collections `<name>_old` and `<name>_new`, with the
    journal at `journal` (default: beside a Milvus Lite file; required for a server).
    `meta`, a JSON-able dict, is kept in the journal (e.g. what the gallery was built
    from) and read back as `index.meta` after `reopen`.
    """

    def __init__(self, old_gallery: np.ndarray, new_dim: int, ids: np.ndarray | None = None,
                 approximate: bool = False, nlist: int = 1024, nprobe: int = 16,
                 new_training_sample: np.ndarray | None = None, backend: str = "faiss",
                 uri: str | None = None, name: str = "gallery", journal: str | Path | None = None,
                 token: str = "", overwrite: bool = False, meta: dict | None = None):
        old_gallery = gallery_rows(old_gallery)
        new_dim, nlist, nprobe = (count(k, v) for k, v in
                                  (("new_dim", new_dim), ("nlist", nlist), ("nprobe", nprobe)))
        meta = check_meta(meta)
        ids = np.arange(len(old_gallery), dtype=np.int64) if ids is None else id_array(ids)
        if len(ids) != len(old_gallery):
            raise RmlibError(f"{len(ids)} ids for {len(old_gallery)} gallery rows")
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            raise RmlibError(f"gallery ids must be unique; e.g. {unique[counts > 1][:3].tolist()} "
                             "repeat")
        if ids.min(initial=0) < 0:
            raise RmlibError("gallery ids must be non-negative (-1 marks a missing result)")
        if approximate and new_training_sample is None:
            raise RmlibError("an approximate index needs new_training_sample (new-model "
                             "embeddings to train its coarse quantizer)")
        dims = {"old": old_gallery.shape[1], "new": new_dim}
        spec = backend_spec(backend)
        check_dims(dims, spec)
        if not spec.durable:
            training = None if not approximate else {
                "old": old_gallery,
                "new": float_rows("new_training_sample", new_training_sample, new_dim)}
            parts = spec.build(dims, approximate, training, min(nlist, len(old_gallery)),
                               nprobe)
            journal = None
        else:
            uri = str(uri or DEFAULT_MILVUS_URI)
            journal = BackfillJournal(check_location(uri, name, journal, spec.local_files))
            parts = open_locked(journal, spec, uri, name, token, nprobe)
        try:
            if journal is not None:
                if parts.exists() and not overwrite:
                    raise RmlibError(
                        f"{backend} at {uri!r} already holds a live index named {name!r}: resume "
                        f"it with OnlineBackfillIndex.reopen(uri={uri!r}, name={name!r}) (or "
                        "`python -m rmlib live` again), or start it again with overwrite=True")
                journal.start({"name": name, "num_items": len(ids), "id_sum": id_sum(ids),
                               "old_dim": dims["old"], "new_dim": dims["new"], "meta": meta})
                parts.drop()  # after the journal says "incomplete": a kill here is redone
                parts.create(dims, approximate, nlist)
            parts.put("old", ids, old_gallery, replace=False)
            if journal is not None:
                journal.created()
        except BaseException:
            parts.close()
            if journal is not None:
                journal.unlock()
            raise
        self._setup(parts, journal, dims, np.sort(ids), np.zeros(len(ids), dtype=bool), meta)

    @classmethod
    def reopen(cls, uri: str = DEFAULT_MILVUS_URI, name: str = "gallery",
               journal: str | Path | None = None, token: str = "", nprobe: int = 16,
               backend: str = "milvus") -> OnlineBackfillIndex:
        """Resume an index of a durable backend (Milvus by default), e.g. after its process
        was killed mid-batch: the journal's unfinished batch is completed, and every item
        is in exactly one part."""
        uri = str(uri)
        spec = backend_spec(backend, durable=True)
        journal = BackfillJournal(check_location(uri, name, journal, spec.local_files))
        nprobe = count("nprobe", nprobe)
        header = journal.header()
        if not header["complete"]:
            raise RmlibError(f"creating the live index {name!r} at {uri!r} did not finish; "
                             "create it again (OnlineBackfillIndex(..., overwrite=True), or "
                             "`python -m rmlib live` does it by itself)")
        if spec.local_files and is_local(uri) and not Path(uri).is_file():
            raise RmlibError(f"no {backend} database file at {uri!r}, though {journal.path} is its "
                             "journal: pass the uri it was created at")
        parts = open_locked(journal, spec, uri, name, token, nprobe)
        try:
            index = cls.__new__(cls)
            index._setup(parts, journal, *_recover(parts, journal, header, uri, name),
                         header.get("meta", {}))
            return index
        except BaseException:
            parts.close()
            journal.unlock()
            raise

    def _setup(self, parts, journal: BackfillJournal | None, dims: dict[str, int],
               sorted_ids: np.ndarray, in_new: np.ndarray, meta: dict) -> None:
        self._parts, self._journal, self._meta = parts, journal, meta
        self.old_dim, self.new_dim = dims["old"], dims["new"]
        self._sorted_ids, self._in_new = sorted_ids, in_new  # id -> is it in the new part?
        self._num_new = int(in_new.sum())
        self._gate = SearchGate()
        self._batch_lock = threading.Lock()  # one batch at a time, whichever thread sends it
        self._moving = np.empty(0, dtype=np.int64)  # ids of the batch in flight (old -> new)
        self._insert_done = False  # has the batch in flight reached the new part?
        self._broken: str | None = None

    def flush(self) -> None:
        """Seal what was written so far into the database's indexed segments (Milvus seals
        them as they fill; a flush makes a freshly loaded gallery search at full speed)."""
        self._open_parts().flush()

    def close(self) -> None:
        """Release the database connection and the journal's lock (the data stays); a
        second close does nothing."""
        parts, self._parts = self._parts, None
        if parts is not None:
            parts.close()
            if self._journal is not None:
                self._journal.unlock()

    @property
    def max_top_k(self) -> int | None:
        """The most results a search may ask for (None: no limit), as the backend says."""
        return self._open_parts().max_top_k

    def _open_parts(self):
        if self._parts is None:
            raise RmlibError("this index is closed; " + (
                "open it again with OnlineBackfillIndex.reopen(uri, name)"
                if self._journal is not None else "build a new one"))
        return self._parts

    # --- state ----------------------------------------------------------------------------
    def _positions(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        unknown = ids[self._sorted_ids[pos] != ids]
        if len(unknown):
            raise RmlibError(f"{len(unknown)} unknown id(s), e.g. {unknown[:3].tolist()}; "
                             "nothing was changed")
        return pos

    @property
    def meta(self) -> dict:
        """What the creator recorded with the index (`meta=`), kept across `reopen`."""
        return dict(self._meta)

    @property
    def num_new(self) -> int:
        return self._num_new

    @property
    def num_old(self) -> int:
        return len(self._in_new) - self.num_new

    @property
    def ratio(self) -> float:
        """The backfilled fraction t."""
        return self.num_new / max(1, len(self._in_new))

    def stored(self) -> dict[str, int]:
        """How many items each part holds, as its store counts them: a check of the
        bookkeeping (num_old and num_new), and of the database after a crash."""
        parts = self._open_parts()
        return {part: parts.count(part) for part in ("old", "new")}

    def part_of(self, ids: np.ndarray) -> np.ndarray:
        """1 where an id is in the new part, 0 where in the old part."""
        return self._in_new[self._positions(id_array(ids))].astype(np.int64)

    # --- backfill ---------------------------------------------------------------------------
    def next_batch(self, order: np.ndarray, size: int) -> np.ndarray:
        """The first `size` ids of a backfill `order` (all gallery ids, most urgent first:
        `rmlib.evaluation.orders`) that are still in the old part: what the backfill job
        re-embeds next. Asked again after a restart, it gives the items not yet moved."""
        self._open_parts()
        size = count("size", size)
        order = id_array(order)
        if len(order) != len(self._sorted_ids) or not np.array_equal(np.sort(order),
                                                                      self._sorted_ids):
            raise RmlibError(f"a backfill order lists every gallery id once; got {len(order)} "
                             f"ids for a gallery of {len(self._sorted_ids)}")
        return order[~self._in_new[self._positions(order)]][:size]

    def backfill(self, ids: np.ndarray, new_embeddings: np.ndarray) -> None:
        """Move a batch of items to the new part (or re-embed items already there).

        Unknown or repeated ids are an error that changes nothing. In Milvus, a batch moves
        in steps of at most the backend's `max_batch` items, each journaled: a search during
        a step asks each part for k plus the step's size, within Milvus's 16,384.
        """
        self._open_parts()
        if self._broken:
            raise RmlibError(self._broken)
        ids = id_array(ids)
        if len(ids) == 0 and np.size(new_embeddings) == 0:
            return  # what next_batch gives once every item is new
        emb = float_rows("new_embeddings", new_embeddings, self.new_dim)
        if len(emb) != len(ids):
            raise RmlibError(f"{len(ids)} ids but {len(emb)} embeddings in the backfill batch")
        pos = self._positions(ids)
        if len(np.unique(ids)) != len(ids):
            raise RmlibError("the backfill batch repeats an id; nothing was changed")
        with self._batch_lock:  # another thread's batch may have failed, or closed it
            step = self._open_parts().max_batch or len(ids)
            if self._broken:
                raise RmlibError(self._broken)
            for start in range(0, len(ids), step):
                part = slice(start, start + step)
                self._move(ids[part], emb[part], pos[part])

    def _move(self, ids: np.ndarray, emb: np.ndarray, pos: np.ndarray) -> None:
        """One journaled batch: insert into the new part, then delete from the old part."""
        was_new = self._in_new[pos]
        moving = np.sort(ids[~was_new])
        try:
            if self._journal is not None:
                self._journal.begin(ids)
            with self._gate.changing():
                self._moving, self._insert_done = moving, False
            self._parts.put("new", ids, emb, replace=bool(was_new.any()))
            if self._journal is not None:
                self._journal.inserted()
            with self._gate.changing():  # from now on the moving items are served as new
                self._insert_done = True
            self._parts.delete("old", moving)
            with self._gate.changing():
                self._in_new[pos] = True
                self._num_new += len(moving)
                self._moving = np.empty(0, dtype=np.int64)
            if self._journal is not None:
                self._journal.done()
        except Exception as e:
            if self._journal is None:
                raise
            self._broken = (f"a backfill batch was interrupted ({e}); close this index and "
                            "resume with OnlineBackfillIndex.reopen(uri, name), which "
                            "finishes the batch")
            raise RmlibError(self._broken) from e

    # --- search -----------------------------------------------------------------------------
    def search(self, new_queries: np.ndarray, old_queries: np.ndarray, k: int = 10
               ) -> SearchResult:
        """Merged top-k: new_queries search the new part, old_queries (e.g. psi(rho(q)))
        the old part; both lists merge by distance, ties by id."""
        nq = float_rows("new_queries", new_queries, self.new_dim)
        oq = float_rows("old_queries", old_queries, self.old_dim)
        if len(nq) != len(oq):
            raise RmlibError(f"{len(nq)} new queries but {len(oq)} old queries")
        k = count("k", k)
        parts = self._open_parts()
        if parts.max_top_k is not None and k > parts.max_top_k:
            raise RmlibError(f"this backend answers at most {parts.max_top_k:,} results "
                             f"per query (its limit less a batch step), not k={k:,}; "
                             "ask for fewer")
        with self._gate.searching():
            moving = self._moving  # served by the old part until the insert is done
            hidden = {"old": moving if self._insert_done else moving[:0],
                      "new": moving[:0] if self._insert_done else moving}
            size = {"old": self.num_old, "new": self.num_new + len(moving)}
            found = []
            for tag, part, q in ((0, "old", oq), (1, "new", nq)):
                kk = min(k + len(hidden[part]), size[part])
                if kk == 0:
                    continue
                d, i = parts.search(part, q, kk)
                if len(hidden[part]):
                    drop = np.isin(i, hidden[part])
                    d, i = np.where(drop, np.inf, d), np.where(drop, -1, i)
                found.append((d, i, np.full(i.shape, tag)))
        d, i, part = (np.concatenate([f[j] for f in found], 1) for j in range(3))
        order = np.lexsort((i, d), axis=1)[:, :k]  # missing results (inf) sort last
        rows = np.arange(len(d))[:, None]
        return SearchResult(np.sqrt(np.maximum(d[rows, order], 0)), i[rows, order],
                            part[rows, order])


def _recover(parts: DurableStore, journal: BackfillJournal, header: dict, uri: str, name: str
             ) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """Check that the database holds the journal's gallery, finish an interrupted batch and
    return (dims, sorted ids, in_new). An item found in both parts (the journal's batch, or
    an insert applied after its sender died) keeps its new entry: that one is whole."""
    dims = parts.open()
    if header["name"] != name or dims != {"old": header["old_dim"], "new": header["new_dim"]}:
        raise RmlibError(f"the journal {journal.path} belongs to the live index "
                         f"{header['name']!r} ({header['old_dim']} -> {header['new_dim']} dims), "
                         f"not to {name!r} at {uri!r} ({dims['old']} -> {dims['new']}); "
                         "pass that index's journal=PATH")
    pending = journal.pending()
    if pending is not None:
        moving = pending[0]
        parts.delete("old", moving[parts.contains("new", moving)])
    old, new = parts.ids("old"), parts.ids("new")
    both = np.intersect1d(old, new)
    if len(both):
        parts.delete("old", both)
        old = np.setdiff1d(old, both)
    journal.done()
    ids = np.sort(np.concatenate([old, new]))
    if len(ids) != header["num_items"]:
        raise RmlibError(f"the live index {name!r} at {uri!r} holds {len(ids):,} items but "
                         f"its journal says {header['num_items']:,}: items were removed outside "
                         "rmlib; create it again with overwrite=True")
    if id_sum(ids) != header["id_sum"]:
        raise RmlibError(f"the live index {name!r} at {uri!r} holds other ids than its "
                         "journal's gallery: it was changed outside rmlib; create it again "
                         "with overwrite=True")
    return dims, ids, np.isin(ids, new)


def live_scores(index: OnlineBackfillIndex, new_queries: np.ndarray, old_queries: np.ndarray,
                protocol: Protocol, ks: tuple[int, ...] = (1, 5), chunk: int = 500
                ) -> QueryScores:
    """mAP and top-k of what the index serves now: each query's merged ranking of the whole
    gallery, with the protocol's exclusions. Gallery ids must be the row numbers the
    protocol uses (the default ids); at the evaluator's backfill states it reproduces the
    evaluator's curve, which the tests check."""
    n = index.num_old + index.num_new
    if protocol.num_gallery != n:
        raise RmlibError(f"the protocol has {protocol.num_gallery} gallery items but the index "
                         f"holds {n}")
    scores = ScoreAccumulator(ks)
    for start, stop in query_chunks(len(new_queries), chunk):
        ranked = torch.from_numpy(index.search(new_queries[start:stop],
                                               old_queries[start:stop], k=n).ids)
        relevant, excluded = protocol.masks(start, stop)
        kept = ~excluded.gather(1, ranked)
        rank_among_kept = torch.cumsum(kept, 1) - 1  # the rank a user sees
        slots, ok = relevant_slots(relevant.gather(1, ranked) & kept)
        scores.add(rank_among_kept.gather(1, slots), ok)
    return scores.result()
