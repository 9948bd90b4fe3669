"""The online-backfill simulation (the paper's Sec. 2.2): merged ranking at ratio t, curves, AUC.

At ratio t the first floor(t * N) items of the backfill order carry new-model embeddings
and are scored by the new system's query; the rest are scored by the old system's query;
all N are ranked together by those distances (rank merge; eq. 3-4 is its top-1 case).

How all 21 points come from one pass per query chunk: a relevant item r has only two
possible rank keys, its new-system key and its old-system key. Its merged rank at ratio
t_j is (# backfilled items whose new key is smaller) + (# not-yet-backfilled items whose
old key is smaller). Each gallery item is backfilled from one grid step on (its segment),
so bucketing every item's keys among the (few) keys of the relevant items and
histogramming (segment, bucket) gives, after two prefix sums, every one of those counts
for every t at once: O(N log R) per query instead of a full sort per query and ratio.

Explained in the book: book/rank_merge, book/evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rmlib import RmlibError
from rmlib.arguments import count, permutation
from rmlib.config import default_device
from rmlib.evaluation.curves import BackfillCurve, check_conditions
from rmlib.evaluation.retrieval import (
    NO_RANK,
    EuclideanSystem,
    Protocol,
    chunk_size,
    evaluate,
    exact_column_sums,
    query_chunks,
    rank_keys,
    relevant_slots,
    scores_from_ranks,
    top1_correct,
)
from rmlib.evaluation.systems import SystemPair

T_GRID = np.round(np.linspace(0.0, 1.0, 21), 10)


def backfill_order(num_gallery: int, seed: int = 0) -> np.ndarray:
    """The order in which gallery items are re-embedded: default_rng(seed).permutation(N)."""
    return np.random.default_rng(count("seed", seed, 0)).permutation(
        count("num_gallery", num_gallery, 0))


def backfilled_count(t: float, num_gallery: int) -> int:
    """floor(t * N), robust to t's float representation (0.35 * 100 is 35, not 34)."""
    return int(math.floor(round(t * num_gallery, 6)))


def item_segments(order: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """For each gallery item, the first grid index j at which it is backfilled (len(ts): never)."""
    n = len(order)
    counts = np.array([backfilled_count(t, n) for t in ts])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    return np.searchsorted(counts, position, side="right")


def backfilled_mask(order: np.ndarray, t: float) -> torch.Tensor:
    """G_t^new as a boolean mask over the gallery: the first floor(t * N) items of `order`."""
    n = len(order)
    is_new = torch.zeros(n, dtype=torch.bool)
    is_new[torch.as_tensor(order[: backfilled_count(t, n)])] = True
    return is_new


def merged_ranking(old_distances: torch.Tensor, new_distances: torch.Tensor,
                   is_new: torch.Tensor, excluded: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank merge (eq. 3-5) of queries (Q, N): the gallery, best first, and the merged distances.

    An item of G_t^new (`is_new`) is scored by the new system's distance, any other item by
    the old system's; all N are ranked by those scores, ties by gallery index. The first of
    each ranking is the choice of eq. 3-4 between the two systems' nearest items.
    """
    merged = torch.where(is_new, new_distances, old_distances)
    return torch.argsort(rank_keys(merged, excluded), dim=1), merged


def counts_below(keys: torch.Tensor, sorted_thresholds: torch.Tensor, segment: torch.Tensor,
                 num_segments: int) -> torch.Tensor:
    """counts[c, j, m]: the gallery items i with segment[i] <= j and keys[c, i] below
    sorted_thresholds[c, m] (for the last m, any key), in one histogram pass.

    keys (C, N) and sorted_thresholds (C, B - 1) are rank keys; segment (N,) holds values in
    0..num_segments - 1. Result: int32 (C, num_segments, B).
    """
    c = keys.shape[0]
    n_bins = sorted_thresholds.shape[1] + 1
    # bucket b: the number of thresholds <= key, so the item is below thresholds b, b + 1, ..
    bucket = torch.searchsorted(sorted_thresholds, keys, right=True)  # the hot spot
    bucket.add_((segment * n_bins)[None, :])  # one histogram cell per (row, segment, bucket)
    bucket.add_((torch.arange(c, device=keys.device) * (num_segments * n_bins))[:, None])
    hist = torch.bincount(bucket.view(-1), minlength=c * num_segments * n_bins)
    hist = hist.view(c, num_segments, n_bins).cumsum(2, dtype=torch.int32)
    for j in range(1, num_segments):  # prefix sum over segments, slice by slice (contiguous)
        hist[:, j] += hist[:, j - 1]
    return hist


def _merged_ranks(
    k_old: torch.Tensor, k_new: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
    segment: torch.Tensor, num_t: int,
) -> torch.Tensor:
    """0-based merged ranks (C, num_t, R) of the relevant items at every grid point."""
    c, width = index.shape
    kn_rel = k_new.gather(1, index)
    ko_rel = k_old.gather(1, index)
    thresholds = torch.cat([kn_rel, ko_rel], 1)
    thresholds = torch.where(torch.cat([valid, valid], 1), thresholds,
                             torch.full_like(thresholds, NO_RANK))
    sorted_thr, order = torch.sort(thresholds, dim=1)
    where = torch.empty_like(order)
    where.scatter_(1, order, torch.arange(2 * width, device=order.device).expand(c, -1))
    new_cum = counts_below(k_new, sorted_thr, segment, num_t + 1)  # [q, j, m]: backfilled
    old_cum = counts_below(k_old, sorted_thr, segment, num_t + 1)  # by step j, key < thr m
    old_total = old_cum[:, -1:, :]
    old_not_yet = old_total - old_cum  # [q, j, m]: not backfilled at step j, old key < thr m

    def counts_at(m: torch.Tensor) -> torch.Tensor:  # m: (C, R) threshold slots -> (C, T, R)
        idx = m[:, None, :].expand(c, num_t, width)
        return new_cum[:, :num_t].gather(2, idx) + old_not_yet[:, :num_t].gather(2, idx)

    at_new = counts_at(where[:, :width])
    at_old = counts_at(where[:, width:])
    steps = torch.arange(num_t, device=index.device)
    backfilled = segment[index][:, None, :] <= steps[None, :, None]
    return torch.where(backfilled, at_new, at_old)


def simulate_backfill(
    old_query: np.ndarray, old_gallery: np.ndarray,
    new_query: np.ndarray, new_gallery: np.ndarray,
    protocol: Protocol,
    order: np.ndarray | None = None,
    seed: int = 0,
    reference_query: np.ndarray | None = None,
    ts: np.ndarray = T_GRID,
    chunk: int | None = None,
    calibration: tuple[Callable, Callable] | None = None,
    reference_gallery: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> BackfillCurve:
    """mAP, top-1, top-5 and negative-flip rate of the rank-merged system at each t in `ts`.

    `old_query` is scored against `old_gallery`, `new_query` against `new_gallery`.
    Negative flips are counted against the deployed old system: `reference_query` (default
    `old_query`) on `reference_gallery` (default `old_gallery`). `calibration`: increasing
    maps of the old and the new system's distances to the scores they are merged by
    (default: the distances themselves). `device`: where the work runs (default: a GPU if
    there is one); only the per-query scores come back to the host, once.
    """
    device = torch.device(device) if device is not None else default_device()
    old = EuclideanSystem.of(old_query, old_gallery, "the old system's embeddings").to(device)
    new = EuclideanSystem.of(new_query, new_gallery, "the new system's embeddings").to(device)
    reference = None
    if reference_query is not None:
        reference = EuclideanSystem.of(
            reference_query, old_gallery if reference_gallery is None else reference_gallery,
            "reference_query").to(device)
    return simulate_backfill_systems(old, new, protocol, order, seed, reference, ts, chunk,
                                     calibration, device)


@dataclass(frozen=True)
class PartedSystem:
    """One gallery that two systems serve, each item by the one its part names: the
    not-yet-re-embedded side of a backfill whose gallery already holds two models'
    embeddings (a second upgrade that arrives mid-backfill, `rmlib.methods.chain`). Its
    distances are the two systems' own, merged as rank merge merges them."""

    first: EuclideanSystem
    second: EuclideanSystem
    in_second: torch.Tensor  # (N,) bool: the items the second system serves

    def distances(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return torch.where(self.in_second, self.second.distances(start, stop),
                           self.first.distances(start, stop))

    def to(self, device: torch.device | str) -> PartedSystem:
        return PartedSystem(self.first.to(device), self.second.to(device),
                            self.in_second.to(device))


def simulate_backfill_systems(
    old: EuclideanSystem | PartedSystem, new: EuclideanSystem | PartedSystem,
    protocol: Protocol, order: np.ndarray | None = None, seed: int = 0,
    reference: EuclideanSystem | None = None, ts: np.ndarray = T_GRID,
    chunk: int | None = None, calibration: tuple[Callable, Callable] | None = None,
    device: torch.device | str | None = None,
) -> BackfillCurve:
    """`simulate_backfill` on systems already made: anything with `distances(start, stop)`
    and `to(device)` serves a side, so a side may itself be a `PartedSystem`. `reference`:
    the deployed system negative flips are counted against, one `EuclideanSystem`
    (default: the old side). `calibration` maps each side's distances as a whole: with a
    parted side, both of its parts get that side's map."""
    old_score, new_score = calibration or (_identity, _identity)
    device = torch.device(device) if device is not None else default_device()
    old, new = old.to(device), new.to(device)
    n = protocol.num_gallery
    if order is None:
        order = backfill_order(n, seed)
    order = permutation("the backfill order", order, n)
    ts = np.asarray(ts, dtype=np.float64)
    segment = torch.as_tensor(item_segments(np.asarray(order), ts), device=device)
    # per query: is the deployed system's top-1 relevant?
    ref_correct = None if reference is None else top1_correct(reference.to(device), protocol)

    num_t = len(ts)
    per_query = [_chunk_scores(old, new, protocol, start, stop, segment, num_t, ref_correct,
                               old_score, new_score)
                 for start, stop in _adaptive_chunks(protocol, num_t, chunk, device)]
    # summed exactly: identical rankings give bit-identical values at every t
    scores = torch.cat(per_query).cpu().numpy()
    n_valid = len(scores)
    if n_valid == 0:
        raise RmlibError("no query has a relevant gallery item: check the labels")
    means = exact_column_sums(scores.reshape(n_valid, -1)).reshape(num_t, 4) / n_valid
    return BackfillCurve(
        t=ts.tolist(), mAP=means[:, 0].tolist(), top1=means[:, 1].tolist(),
        top5=means[:, 2].tolist(), nfr=means[:, 3].tolist(), num_valid_queries=n_valid,
    )


def _chunk_scores(old: EuclideanSystem | PartedSystem, new: EuclideanSystem | PartedSystem,
                  protocol: Protocol, start: int,
                  stop: int, segment: torch.Tensor, num_t: int, ref_correct: torch.Tensor | None,
                  old_score: Callable, new_score: Callable) -> torch.Tensor:
    """(valid queries of start:stop, t, 4): AP, top-1, top-5 and negative flip at every t."""
    relevant, excluded = protocol.masks(start, stop, segment.device)
    index, valid = relevant_slots(relevant)
    k_old = rank_keys(old_score(old.distances(start, stop)), excluded)
    k_new = rank_keys(new_score(new.distances(start, stop)), excluded)
    if ref_correct is None:  # the old system itself is the reference
        chunk_ref = relevant.gather(1, k_old.argmin(1, keepdim=True))[:, 0]
    else:
        chunk_ref = ref_correct[start:stop]
    ranks = _merged_ranks(k_old, k_new, index, valid, segment, num_t)
    ap, hits = scores_from_ranks(ranks, valid[:, None, :].expand_as(ranks))
    flips = chunk_ref[:, None] & ~hits[1]
    columns = [ap, hits[1].double(), hits[5].double(), flips.double()]
    return torch.stack(columns, 2)[valid.any(1)]


def _identity(distances: torch.Tensor) -> torch.Tensor:
    return distances


def _adaptive_chunks(protocol: Protocol, num_t: int, chunk: int | None, device: torch.device):
    """Query chunks sized for the CPU's caches (or a GPU's memory), with room for the
    (chunk, t, 2R+1) histograms."""
    if chunk is None:
        _, counts = np.unique(protocol.gallery_labels, return_counts=True)
        chunk = chunk_size(protocol.num_gallery, (num_t + 1) * (2 * int(counts.max()) + 1),
                           device)
    yield from query_chunks(protocol.num_queries, chunk)


def backfill_arrays(arrays: SystemPair, seed: int = 0, new_baseline: dict | None = None,
                    old_baseline: dict | None = None,
                    calibration: tuple[Callable, Callable] | None = None,
                    order: np.ndarray | None = None,
                    device: torch.device | str | None = None) -> tuple[BackfillCurve, dict]:
    """Simulate the backfill of an evaluation file and check conditions (6)-(8).

    `order`: which items are re-embedded first (default: the random order of `seed`);
    `device`: where the distances are computed (default: a GPU when there is one).

    The old baseline defaults to the deployed old system (reference_query, else old_query,
    on the old gallery); the new baseline to the file's own new system (M_1 itself). Pass
    the metrics ({"mAP", "top1"}) of the original models to judge transformed ones.
    """
    protocol = arrays.protocol()
    curve = simulate_backfill(
        arrays.old_query, arrays.old_gallery, arrays.new_query, arrays.new_gallery, protocol,
        order=order, seed=seed, reference_query=arrays.reference_query,
        reference_gallery=arrays.reference_gallery, calibration=calibration, device=device)
    if old_baseline is not None:
        old = old_baseline
    elif arrays.reference_query is None:
        old = {"mAP": curve.mAP[0], "top1": curve.top1[0]}
    else:
        old = evaluate(*arrays.reference_side(), protocol).summary()
    new = new_baseline or {"mAP": curve.mAP[-1], "top1": curve.top1[-1]}
    return curve, check_conditions(curve, old, new)


def merged_top_k(arrays: SystemPair, query: int, t: float, k: int = 8, seed: int = 0
                 ) -> list[tuple[int, float, str, bool]]:
    """One query's merged top-k at ratio t: (gallery index, distance, 'old'|'new', relevant)."""
    protocol = arrays.protocol()
    relevant, excluded = protocol.masks(query, query + 1)
    is_new = backfilled_mask(backfill_order(protocol.num_gallery, seed), t)
    old = EuclideanSystem.of(arrays.old_query, arrays.old_gallery)
    new = EuclideanSystem.of(arrays.new_query, arrays.new_gallery)
    ranking, dist = merged_ranking(old.distances(query, query + 1),
                                   new.distances(query, query + 1), is_new, excluded)
    top = ranking[0, :k]
    return [(int(i), float(dist[0, i]), "new" if is_new[i] else "old", bool(relevant[0, i]))
            for i in top]
