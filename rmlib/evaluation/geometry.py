"""Where two systems put things: the distances a merged ranking compares, and how much of a
space an embedding uses.

Distance rank merge ranks the new part's items by their distance in the new system and the
old part's by theirs in the old system, in one list. It ranks well only where a relevant
item of either part is closer than an irrelevant item of the other: `part_distances`
measures that on a sample of queries, and `merged_top_k` what the merged lists hold at a
few ratios. `spread` measures the cone an embedding sits in (the
length of its mean vector, the typical distance between two items and to a near
neighbour): a system whose items are packed close together wins every merge.

Explained in the book: book/baselines, book/rank_merge.
"""

from __future__ import annotations

import numpy as np
import torch

from rmlib.evaluation.backfill import backfill_order, backfilled_count
from rmlib.evaluation.systems import SystemPair
from rmlib.losses import pairwise_distances


def _distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return pairwise_distances(torch.as_tensor(queries, dtype=torch.float32),
                              torch.as_tensor(gallery, dtype=torch.float32)).numpy()


def part_distances(pair: SystemPair, queries: int = 1000, seed: int = 0) -> dict:
    """For a sample of `queries` queries (drawn with `seed`): the median distance from a
    query to relevant and to irrelevant items of the new part (the new system) and of the
    old part (the old system), and how often an irrelevant item of one part is closer than
    a relevant item of the other (`crossing`: over random pairs of such items). Relevance
    is the same label; a query's own item is left out when the gallery is the query set.
    """
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(pair.query_labels), min(queries, len(pair.query_labels)),
                           replace=False))
    gallery_labels = pair.query_labels if pair.leave_one_out else pair.gallery_labels
    relevant = pair.query_labels[q, None] == gallery_labels[None, :]
    valid = np.ones_like(relevant)
    if pair.leave_one_out:
        valid[np.arange(len(q)), q] = False
    parts = {"new": _distances(pair.new_query[q], pair.new_gallery),
             "old": _distances(pair.old_query[q], pair.old_gallery)}
    cells = {part: {"relevant": d[relevant & valid], "irrelevant": d[~relevant & valid]}
             for part, d in parts.items()}
    out = {f"{part} {kind}": float(np.median(v)) if len(v) else float("nan")
           for part, kinds in cells.items() for kind, v in kinds.items()}
    for near, far in (("new", "old"), ("old", "new")):
        a, b = cells[near]["irrelevant"], cells[far]["relevant"]
        out[f"{near} irrelevant closer than {far} relevant"] = float(np.mean(
            rng.choice(a, 100_000) < rng.choice(b, 100_000))) if len(a) and len(b) else \
            float("nan")
    return out


def spread(embeddings: np.ndarray, sample: int = 2000, k: int = 8, seed: int = 0) -> dict:
    """How much of its space an embedding uses, on a sample of `sample` items: the length
    of the mean vector (1 when every item is the same unit vector, near 0 when they are
    spread over the sphere), the median distance between two items, and the median
    distance from an item to its `k`-th nearest other item."""
    rng = np.random.default_rng(seed)
    x = embeddings[np.sort(rng.choice(len(embeddings), min(sample, len(embeddings)),
                                      replace=False))]
    d = _distances(x, x)
    off = ~np.eye(len(x), dtype=bool)
    return {"mean_vector_length": float(np.linalg.norm(np.asarray(x, np.float64).mean(0))),
            "median_pair_distance": float(np.median(d[off])),
            f"median_distance_to_neighbour_{k}": float(np.median(np.sort(d, axis=1)[:, k]))}


def merged_top_k(pair: SystemPair, ts: tuple[float, ...] = (0.05, 0.25, 0.5), k: int = 10,
                 queries: int = 1000, seed: int = 0) -> dict:
    """What each query's merged top `k` holds at each backfill ratio t (random order of
    `seed`, on a sample of `queries` queries): the share of its items that come from the
    new part (against the new part's share t of the gallery), and the share of the new
    part's and of the old part's items there that are relevant."""
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(pair.query_labels), min(queries, len(pair.query_labels)),
                           replace=False))
    gallery_labels = pair.query_labels if pair.leave_one_out else pair.gallery_labels
    relevant = pair.query_labels[q, None] == gallery_labels[None, :]
    old_d = _distances(pair.old_query[q], pair.old_gallery)
    new_d = _distances(pair.new_query[q], pair.new_gallery)
    if pair.leave_one_out:  # a query does not retrieve itself
        old_d[np.arange(len(q)), q] = new_d[np.arange(len(q)), q] = np.inf
    order, n = backfill_order(len(gallery_labels), seed), len(gallery_labels)
    out = {}
    for t in ts:
        in_new = np.zeros(n, dtype=bool)
        in_new[order[:backfilled_count(t, n)]] = True
        top = np.argsort(np.where(in_new, new_d, old_d), axis=1, kind="stable")[:, :k]
        from_new, hit = in_new[top], np.take_along_axis(relevant, top, axis=1)
        out[f"{t:g}"] = {
            "from_new_part": float(from_new.mean()),
            "new_items_relevant": float(hit[from_new].mean()) if from_new.any() else
            float("nan"),
            "old_items_relevant": float(hit[~from_new].mean()) if (~from_new).any() else
            float("nan")}
    return out

