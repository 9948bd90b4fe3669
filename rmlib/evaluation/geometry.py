"""Where two systems put things: the distances a merged ranking compares, and how much of a
space an embedding uses.

Distance rank merge ranks the new part's items by their distance in the new system and the
old part's by theirs in the old system, in one list. It ranks well only where a relevant
item of either part is closer than an irrelevant item of the other: `part_distances`
measures that on a sample of queries, and `merged_shares` what the merged lists hold at
a few ratios. `spread` measures the cone an embedding sits in (the
length of its mean vector, the typical distance between two items and to a near
neighbour): a system whose items are packed close together wins every merge.

Explained in the book: book/baselines, book/rank_merge.
"""

from __future__ import annotations

import numpy as np
import torch

from rmlib.evaluation.backfill import backfill_order, backfilled_mask, merged_ranking
from rmlib.evaluation.retrieval import EuclideanSystem
from rmlib.evaluation.systems import SystemPair


def sample_queries(pair: SystemPair, queries: int = 1000, seed: int = 0
                   ) -> tuple[np.ndarray, ...]:
    """A sample of `queries` queries (drawn with `seed`), with their (relevant, excluded)
    masks under the pair's own protocol (leave-one-out, camera or plain), as the
    evaluator scores them, and the two systems' distances: computed once, and read by
    `part_distances` and `merged_shares` alike."""
    protocol = pair.protocol()
    q = np.sort(np.random.default_rng(seed).choice(
        len(pair.query_labels), min(queries, len(pair.query_labels)), replace=False))
    relevant, excluded = [], []
    for start in range(0, len(pair.query_labels), 1024):  # the masks of a block at a time
        rows = q[(q >= start) & (q < start + 1024)]
        if len(rows):
            r, e = protocol.masks(start, min(start + 1024, len(pair.query_labels)))
            relevant.append(r.numpy()[rows - start])
            excluded.append(e.numpy()[rows - start])
    old = EuclideanSystem.of(pair.old_query[q], pair.old_gallery).distances().numpy()
    new = EuclideanSystem.of(pair.new_query[q], pair.new_gallery).distances().numpy()
    return q, np.concatenate(relevant), np.concatenate(excluded), old, new


def _draw(keys: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, one column drawn uniformly among those of `mask` (`keys` random), and
    whether the row has any."""
    picked = np.where(mask, keys, -1.0).argmax(axis=1)
    return picked, mask.any(axis=1)


def part_distances(pair: SystemPair, queries: int = 1000, seed: int = 0,
                   draws: int = 20, sample: tuple[np.ndarray, ...] | None = None) -> dict:
    """For a sample of `queries` queries: the median distance from a query to relevant and
    to irrelevant items of the new part (the new system) and of the old part (the old
    system), relevance and removed items as the pair's protocol has them; and how often,
    for one query, an irrelevant item of one part is closer than a relevant item of the
    other (`draws` random pairs of such items per query): what decides whether a merged
    list puts the relevant item first. `sample`: `sample_queries(pair, queries, seed)`,
    if already made."""
    rng = np.random.default_rng(seed)
    _, relevant, excluded, old, new = sample or sample_queries(pair, queries, seed)
    kinds = {"relevant": relevant & ~excluded, "irrelevant": ~relevant & ~excluded}
    parts = {"new": new, "old": old}
    out = {f"{part} {kind}": float(np.median(d[mask])) if mask.any() else float("nan")
           for part, d in parts.items() for kind, mask in kinds.items()}
    for near, far in (("new", "old"), ("old", "new")):
        wins, pairs = 0, 0
        for _ in range(draws):
            a, has_a = _draw(rng.random(old.shape), kinds["irrelevant"])
            b, has_b = _draw(rng.random(old.shape), kinds["relevant"])
            rows = np.flatnonzero(has_a & has_b)
            wins += int((parts[near][rows, a[rows]] < parts[far][rows, b[rows]]).sum())
            pairs += len(rows)
        out[f"{near} irrelevant closer than {far} relevant"] = wins / pairs if pairs else \
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
    d = EuclideanSystem.of(x, x).distances().numpy()
    off = ~np.eye(len(x), dtype=bool)
    return {"mean_vector_length": float(np.linalg.norm(np.asarray(x, np.float64).mean(0))),
            "median_pair_distance": float(np.median(d[off])),
            f"median_distance_to_neighbour_{k}": float(np.median(np.sort(d, axis=1)[:, k]))}


def merged_shares(pair: SystemPair, ts: tuple[float, ...] = (0.05, 0.25, 0.5), k: int = 10,
                  queries: int = 1000, seed: int = 0, order: np.ndarray | None = None,
                  sample: tuple[np.ndarray, ...] | None = None) -> dict:
    """What the merged top `k` of a sample of `queries` queries holds at each backfill
    ratio t, ranked as the evaluator ranks it (`merged_ranking`, in `order`, default the
    random order of `seed`): the share of its items that come from the new part (against
    the new part's share t of the gallery), and the share of the new part's and of the
    old part's items there that are relevant. For merges by raw distance (a calibrated
    merge ranks by other scores). `sample`: as `part_distances`'."""
    _, relevant, excluded, old, new = sample or sample_queries(pair, queries, seed)
    order = backfill_order(len(pair.old_gallery), seed) if order is None else order
    out = {}
    for t in ts:
        is_new = backfilled_mask(order, t)
        ranking, _ = merged_ranking(torch.as_tensor(old), torch.as_tensor(new), is_new,
                                    torch.as_tensor(excluded))
        top = ranking[:, :k].numpy()
        from_new, hit = is_new.numpy()[top], np.take_along_axis(relevant, top, axis=1)
        out[f"{t:g}"] = {
            "from_new_part": float(from_new.mean()),
            "new_items_relevant": float(hit[from_new].mean()) if from_new.any() else
            float("nan"),
            "old_items_relevant": float(hit[~from_new].mean()) if (~from_new).any() else
            float("nan")}
    return out
