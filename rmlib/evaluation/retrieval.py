"""Single-system retrieval: Euclidean distances, the evaluation protocols, rank-based metrics.

Conventions (one evaluator for every row of Table 1):
  - distances are Euclidean on the rows as given;
  - ties are broken by gallery index, as a stable sort would: every (distance, index) pair
    is packed into one int64 *rank key* (float32 bits above, gallery index below), so a
    strict comparison of keys is the full ranking order and a rank is a count of smaller keys;
  - AP is non-interpolated and rank-based over all relevant gallery items, CMC top-k is the
    share of valid queries with a relevant item among the first k, and a query with no
    relevant item is not valid (it is skipped, as in Market-1501's protocol).

Explained in the book: book/rank_merge, book/evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rmlib import RmlibError

INDEX_BITS = 32
NO_RANK = torch.iinfo(torch.int64).max  # padding for "no relevant item in this slot"


def euclidean_distances(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, N) float32 Euclidean distances: |q|^2 + |g|^2 - 2 q.g in one fused matmul.

    Accurate only for rows near the origin and of moderate size; `EuclideanSystem`
    prepares any embeddings so that they are.
    """
    q = query.float()
    g = gallery.float()
    sq = torch.addmm((g * g).sum(1)[None, :], q, g.T, alpha=-2.0)
    return sq.add_((q * q).sum(1, keepdim=True)).clamp_min_(0.0).sqrt_()


# Distances must stay normal float32 numbers with room to spare: the largest is at most
# twice the spread, the ones that decide a ranking may be a thousand times smaller.
_LARGEST_SPREAD = 2.0 ** 120
_SMALLEST_SPREAD = 2.0 ** -100


@dataclass(frozen=True)
class EuclideanSystem:
    """One retrieval system's queries and gallery, prepared for exact float32 distances.

    Euclidean distances do not change when both sides move by one vector, but the fused
    expansion does: far from the origin it cancels (embeddings shifted by +1000 lose every
    digit) and its squares overflow float32 long before the distances do. So both sides
    are centred on the gallery's mean (in float64) and divided by a power of two that
    brings them to unit size, which is exact in binary floating point; `distances`
    multiplies back by that power of two. The results are the distances to float32
    accuracy relative to the spread of the embeddings (near-duplicates closer than about
    3e-4 of it may swap places), comparable with another system's (rank merge compares
    them), wherever the embeddings sit.
    """

    query: torch.Tensor  # float32, centred and scaled
    gallery: torch.Tensor
    scale: float  # a power of two

    @classmethod
    def of(cls, query: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray,
           name: str = "the embeddings") -> EuclideanSystem:
        q = torch.as_tensor(np.asarray(query), dtype=torch.float64)
        g = torch.as_tensor(np.asarray(gallery), dtype=torch.float64)
        centre = g.mean(0)
        q, g = q - centre, g - centre
        largest = float(max(q.abs().max(), g.abs().max()))
        if largest == 0:  # every item in one place: all distances are zero
            return cls(q.float(), g.float(), 1.0)
        unit = 2.0 ** math.frexp(largest)[1]  # squares of tiny or huge values leave float64
        spread = unit * float(max((q / unit).norm(dim=1).max(), (g / unit).norm(dim=1).max()))
        if not math.isfinite(spread) or spread > _LARGEST_SPREAD:
            raise RmlibError(f"{name} lie up to {spread:.1e} apart, beyond what float32 "
                             "distances hold; divide all four arrays by one common factor")
        if spread < _SMALLEST_SPREAD:
            raise RmlibError(f"{name} lie only {spread:.1e} apart, below what float32 "
                             "distances resolve; multiply all four arrays by one common factor")
        scale = 2.0 ** math.frexp(spread)[1]
        return cls(q.div_(scale).float(), g.div_(scale).float(), scale)

    def distances(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(stop - start, N) float32 distances of queries start:stop to the whole gallery."""
        return euclidean_distances(self.query[start:stop], self.gallery).mul_(self.scale)

    def to(self, device: torch.device | str) -> EuclideanSystem:
        return EuclideanSystem(self.query.to(device), self.gallery.to(device), self.scale)


def rank_keys(distances: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Pack (distance, gallery index) into sortable int64 keys; excluded items rank last.

    Non-negative float32 values order like their bit patterns, so the high 32 bits carry
    the distance and the low 32 bits the gallery index that breaks ties.
    """
    d = distances.float().abs()  # abs turns -0.0 into +0.0, whose bits sort first
    if excluded is not None:
        d.masked_fill_(excluded, float("inf"))
    keys = d.view(torch.int32).to(torch.int64).bitwise_left_shift_(INDEX_BITS)
    return keys.bitwise_or_(torch.arange(d.shape[1], dtype=torch.int64, device=d.device))


@dataclass(frozen=True)
class Protocol:
    """Which gallery items are relevant to, or removed for, each query.

    - plain: relevant = same label;
    - leave-one-out (`self_excluded`): the gallery is the query set, item i removed for query i;
    - camera (Market-1501): gallery items of the same label and the same camera are removed.
    """

    query_labels: np.ndarray
    gallery_labels: np.ndarray
    query_cams: np.ndarray | None = None
    gallery_cams: np.ndarray | None = None
    self_excluded: bool = False

    @classmethod
    def leave_one_out(cls, labels: np.ndarray) -> Protocol:
        labels = np.asarray(labels)
        return cls(labels, labels, self_excluded=True)

    @classmethod
    def camera(
        cls, query_labels: np.ndarray, gallery_labels: np.ndarray,
        query_cams: np.ndarray, gallery_cams: np.ndarray,
    ) -> Protocol:
        return cls(np.asarray(query_labels), np.asarray(gallery_labels),
                   np.asarray(query_cams), np.asarray(gallery_cams))

    @property
    def num_queries(self) -> int:
        return len(self.query_labels)

    @property
    def num_gallery(self) -> int:
        return len(self.gallery_labels)

    def masks(self, start: int, stop: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(relevant, excluded) boolean masks of shape (stop - start, N) for queries start:stop."""
        ql = torch.as_tensor(self.query_labels[start:stop], device=device)
        gl = torch.as_tensor(self.gallery_labels, device=device)
        same = ql[:, None] == gl[None, :]
        excluded = torch.zeros_like(same)
        if self.self_excluded:
            rows = torch.arange(stop - start, device=device)
            excluded[rows, rows + start] = True
        if self.query_cams is not None:
            qc = torch.as_tensor(self.query_cams[start:stop], device=device)
            gc = torch.as_tensor(self.gallery_cams, device=device)
            excluded |= same & (qc[:, None] == gc[None, :])
        return same & ~excluded, excluded


# Queries per chunk are sized so that one chunk's (queries x gallery) int64 rank keys take
# about 20 MB and stay near the CPU's caches: at 10,000 x 10,000 the 21-point curve takes
# 3.9 s in chunks of 256 queries against 6.4 s in chunks of 2,048 (2-core AMD EPYC), and
# memory stays bounded whatever the gallery's size.
CHUNK_ELEMENTS = 1_250_000
ACCELERATOR_CHUNK_ELEMENTS = 32_000_000  # a GPU wants large kernels; about 2 GB a chunk


def chunk_size(num_gallery: int, per_query: int = 0, device: torch.device | str = "cpu") -> int:
    """Queries per chunk for a gallery of `num_gallery` (and `per_query` more cells each)."""
    budget = CHUNK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return int(np.clip(budget // max(num_gallery, per_query, 1), 1, 8192))


def query_chunks(num_queries: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, num_queries, chunk):
        yield start, min(start + chunk, num_queries)


def relevant_slots(relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery indices of each query's relevant items, padded: (index (C, R), valid (C, R))."""
    rows, cols = relevant.nonzero(as_tuple=True)  # row-major, so each row's items in order
    counts = relevant.sum(1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=relevant.device) - first[rows]
    index = torch.zeros(relevant.shape[0], width, dtype=torch.int64, device=relevant.device)
    index[rows, slot] = cols
    valid = torch.arange(width, device=relevant.device)[None, :] < counts[:, None]
    return index, valid


def exact_column_sums(values: np.ndarray) -> np.ndarray:
    """Column sums of a (rows, columns) array, correctly rounded (math.fsum).

    The result does not depend on the order of the rows, the chunking of the queries or
    the CPU's vector width: identical columns give bit-identical sums.
    """
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return np.array([math.fsum(column.tolist()) for column in values.T])


@dataclass
class QueryScores:
    """Per-query results: average precision, top-k hits, and whether the query is valid."""

    ap: np.ndarray
    hits: dict[int, np.ndarray]
    valid: np.ndarray

    def summary(self) -> dict[str, float]:
        v = self.valid
        n = int(v.sum())

        def mean(x: np.ndarray) -> float:
            return float(exact_column_sums(x[v])[0] / n) if n else float("nan")

        return {"mAP": mean(self.ap), **{f"top{k}": mean(h) for k, h in self.hits.items()}}


def scores_from_ranks(ranks: torch.Tensor, valid: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """AP and top-k hits from the 0-based ranks of relevant items (..., R); padding = invalid.

    AP = mean over relevant items of (its position among the relevant) / (its rank + 1),
    summed in rank order (a cumulative sum: one fixed order whatever the vector width).
    """
    r = ranks.masked_fill(~valid, torch.iinfo(ranks.dtype).max)
    r = torch.sort(r, dim=-1).values
    n_rel = valid.sum(-1)
    position = torch.arange(1, r.shape[-1] + 1, device=r.device, dtype=torch.float64)
    inside = position <= n_rel[..., None]
    precision = (position / (r.double() + 1.0)) * inside
    ap = precision.cumsum(-1)[..., -1] / n_rel.clamp_min(1)
    first = r[..., 0]
    hits = {k: (first < k) & (n_rel > 0) for k in ks}
    return ap, hits


class ScoreAccumulator:
    """AP and top-k hits of queries, chunk by chunk, from the ranks of their relevant items:
    the one way every evaluator here (offline and the live index) scores a ranking."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)):
        self.ks = ks
        self._ap: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []
        self._hits: dict[int, list[torch.Tensor]] = {k: [] for k in ks}

    def add(self, ranks: torch.Tensor, valid: torch.Tensor) -> None:
        """0-based ranks (C, R) of each query's relevant items; `valid` marks real slots."""
        ap, hits = scores_from_ranks(ranks, valid, self.ks)
        self._ap.append(ap)
        self._valid.append(valid.any(-1))
        for k in self.ks:
            self._hits[k].append(hits[k])

    def result(self) -> QueryScores:
        return QueryScores(torch.cat(self._ap).numpy(),
                           {k: torch.cat(v).numpy() for k, v in self._hits.items()},
                           torch.cat(self._valid).numpy())


def evaluate(query: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray,
             protocol: Protocol, ks: tuple[int, ...] = (1, 5), chunk: int | None = None
             ) -> QueryScores:
    """mAP and CMC top-k of one retrieval system {query, gallery} under a protocol."""
    system = EuclideanSystem.of(query, gallery)
    scores = ScoreAccumulator(ks)
    chunk = chunk or chunk_size(protocol.num_gallery)
    for start, stop in query_chunks(len(system.query), chunk):
        relevant, excluded = protocol.masks(start, stop)
        keys = rank_keys(system.distances(start, stop), excluded)
        index, ok = relevant_slots(relevant)
        scores.add(torch.searchsorted(torch.sort(keys, dim=1).values, keys.gather(1, index)), ok)
    return scores.result()


def top1_correct(system: EuclideanSystem, protocol: Protocol, chunk: int | None = None
                 ) -> torch.Tensor:
    """Whether each query's first result is relevant (the basis of negative flips), on the
    system's device."""
    device = system.query.device
    out = []
    chunk = chunk or chunk_size(protocol.num_gallery, device=device)
    for start, stop in query_chunks(len(system.query), chunk):
        relevant, excluded = protocol.masks(start, stop, device)
        keys = rank_keys(system.distances(start, stop), excluded)
        out.append(relevant.gather(1, keys.argmin(1, keepdim=True))[:, 0])
    return torch.cat(out)
