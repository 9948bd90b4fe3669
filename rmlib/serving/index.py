"""Serving during a live backfill: one merged faiss index that grows as items are re-embedded.

Two searchable parts over one gallery: the *old part* holds old-model embeddings of the
items not yet backfilled, the *new part* the new-model embeddings of those that are. A
backfill batch moves items (by id) from the old part to the new part; every item is in
exactly one part at all times. A query brings two embeddings from one backbone pass,
rho_new(q) for the new part and rho_rev(q) = psi(rho_new(q)) for the old part (or any two
query embeddings), and gets one merged top-k, ranked by distance with ties broken by id,
as the offline evaluator ranks them.

Exact (flat) indexes by default; `approximate=True` uses IVF indexes (they support removal),
whose recall against exact search the benchmark reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from rmlib import RmlibError
from rmlib.evaluation.retrieval import (
    Protocol,
    QueryScores,
    ScoreAccumulator,
    query_chunks,
    relevant_slots,
)


def _as_rows(name: str, x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise RmlibError(f"{name} must have shape (n, {dim}), got {x.shape}")
    if not np.isfinite(x).all():
        raise RmlibError(f"{name} has NaN or inf; re-extract those embeddings")
    return x


def _ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise RmlibError(f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    return ids.astype(np.int64)


def _part(dim: int, approximate: bool, train: np.ndarray | None, nlist: int, nprobe: int):
    if not approximate:
        return faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
    ivf.train(train)
    ivf.nprobe = nprobe
    return ivf  # IVF lists carry ids and support removal themselves


@dataclass
class SearchResult:
    """Merged top-k per query: Euclidean distances, gallery ids, and the part (0 old, 1 new)."""

    distances: np.ndarray
    ids: np.ndarray
    parts: np.ndarray


class OnlineBackfillIndex:
    """A gallery during its backfill: an old part and a new part, searched as one."""

    def __init__(self, old_gallery: np.ndarray, new_dim: int, ids: np.ndarray | None = None,
                 approximate: bool = False, nlist: int = 1024, nprobe: int = 16,
                 new_training_sample: np.ndarray | None = None):
        old_gallery = _as_rows("old_gallery", old_gallery, np.asarray(old_gallery).shape[-1])
        ids = np.arange(len(old_gallery), dtype=np.int64) if ids is None else _ids(ids)
        if len(ids) != len(old_gallery):
            raise RmlibError(f"{len(ids)} ids for {len(old_gallery)} gallery rows")
        if len(np.unique(ids)) != len(ids):
            raise RmlibError("gallery ids must be unique")
        if approximate and new_training_sample is None:
            raise RmlibError("an approximate index needs new_training_sample (new-model "
                             "embeddings to train its coarse quantizer)")
        self.old_dim, self.new_dim = old_gallery.shape[1], new_dim
        nlist = min(nlist, len(old_gallery))
        self._old = _part(self.old_dim, approximate, old_gallery, nlist, nprobe)
        sample = None if new_training_sample is None else _as_rows(
            "new_training_sample", new_training_sample, new_dim)
        self._new = _part(new_dim, approximate, sample, min(nlist, len(sample))
                          if sample is not None else nlist, nprobe)
        self._old.add_with_ids(old_gallery, ids)
        self._in_new = dict.fromkeys(ids.tolist(), False)  # id -> is it in the new part?

    # --- state ----------------------------------------------------------------------------
    @property
    def num_old(self) -> int:
        return int(self._old.ntotal)

    @property
    def num_new(self) -> int:
        return int(self._new.ntotal)

    @property
    def ratio(self) -> float:
        """The backfilled fraction t."""
        return self.num_new / max(1, len(self._in_new))

    def part_of(self, ids: np.ndarray) -> np.ndarray:
        """1 where an id is in the new part, 0 where in the old part."""
        return np.array([int(self._in_new[int(i)]) for i in _ids(ids)], dtype=np.int64)

    # --- backfill ---------------------------------------------------------------------------
    def next_batch(self, order: np.ndarray, size: int) -> np.ndarray:
        """The first `size` ids of a backfill `order` (all gallery ids, most urgent first:
        `rmlib.methods.orders`) that are still in the old part: what the backfill job
        re-embeds next. Asked again after a restart, it gives the items not yet moved."""
        order = _ids(order)
        if len(order) != len(self._in_new) or set(order.tolist()) != self._in_new.keys():
            raise RmlibError(f"a backfill order lists every gallery id once; got {len(order)} "
                             f"ids for a gallery of {len(self._in_new)}")
        if size < 1:
            raise RmlibError(f"a backfill batch has at least one item, not {size}")
        waiting = np.array([not self._in_new[i] for i in order.tolist()], dtype=bool)
        return order[waiting][:size]

    def backfill(self, ids: np.ndarray, new_embeddings: np.ndarray) -> None:
        """Move a batch of items to the new part (or re-embed items already there).

        Unknown or repeated ids are an error that changes nothing.
        """
        ids = _ids(ids)
        emb = _as_rows("new_embeddings", new_embeddings, self.new_dim)
        if len(emb) != len(ids):
            raise RmlibError(f"{len(ids)} ids but {len(emb)} embeddings in the backfill batch")
        unknown = [int(i) for i in ids if int(i) not in self._in_new]
        if unknown:
            raise RmlibError(f"{len(unknown)} unknown id(s) in the backfill batch, e.g. "
                             f"{unknown[:3]}; nothing was changed")
        if len(np.unique(ids)) != len(ids):
            raise RmlibError("the backfill batch repeats an id; nothing was changed")
        in_new = np.array([self._in_new[int(i)] for i in ids])
        if (~in_new).any():
            self._old.remove_ids(ids[~in_new])
        if in_new.any():  # re-embedding: replace the new-part entry
            self._new.remove_ids(ids[in_new])
        self._new.add_with_ids(emb, ids)
        for i in ids.tolist():
            self._in_new[i] = True

    # --- search -----------------------------------------------------------------------------
    def search(self, new_queries: np.ndarray, old_queries: np.ndarray, k: int = 10
               ) -> SearchResult:
        """Merged top-k: new_queries search the new part, old_queries (e.g. psi(rho(q)))
        the old part; both lists merge by distance, ties by id."""
        nq = _as_rows("new_queries", new_queries, self.new_dim)
        oq = _as_rows("old_queries", old_queries, self.old_dim)
        if len(nq) != len(oq):
            raise RmlibError(f"{len(nq)} new queries but {len(oq)} old queries")
        found = []
        for tag, index, q in ((0, self._old, oq), (1, self._new, nq)):
            kk = min(k, int(index.ntotal))
            if kk > 0:
                d, i = index.search(q, kk)
                found.append((d, i, np.full(i.shape, tag)))
        d, i, part = (np.concatenate([f[j] for f in found], 1) for j in range(3))
        d = np.where(i < 0, np.inf, d)  # faiss pads missing results with id -1
        order = np.lexsort((i, d), axis=1)[:, :k]
        rows = np.arange(len(d))[:, None]
        return SearchResult(np.sqrt(np.maximum(d[rows, order], 0)), i[rows, order],
                            part[rows, order])


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
