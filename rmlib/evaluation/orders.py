"""Which gallery items to re-embed first: backfill order policies, beside the evaluator.

The paper backfills in a random order. Any permutation of the gallery is an order; the
evaluator (`simulate_backfill(order=...)`), the CLI (`backfill --order`) and the live
index (`OnlineBackfillIndex.next_batch`) take one. Each policy is a registered
`OrderPolicy` (`ORDER_POLICIES`): how it orders a gallery, and whether it is seeded, learns
from training items, or reads what a deployment cannot (privileged); the CLI's choices
and the study's rows come from the registry. A new policy is one function and one
`register_order_policy(...)`. The policies:

- `random`: `default_rng(seed).permutation(N)`, the paper's.
- `uncertainty`: the largest *predicted* benefit first. A small head, trained on the
  training set's embeddings (never the evaluation set), predicts from an item's old
  embedding alone how much re-embedding it will help the merged system; in the spirit of
  FastFill's sigma head (Jaeckle et al. 2023), which orders by the predicted error of
  the transformed old embedding.
- `oracle`: the same benefit measured on the evaluation set, with its new embeddings and
  its labels: a privileged order that no deployment can run (it needs what the backfill
  is about to compute), reported as such. It is greedy per item, so it is a reference for
  what an order can buy, not a bound on every metric.

Explained in the book: book/beyond.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmlib import RmlibError
from rmlib.arguments import permutation
from rmlib.evaluation.backfill import backfill_order
from rmlib.evaluation.emb_file import readable_file
from rmlib.evaluation.retrieval import EuclideanSystem, query_chunks
from rmlib.evaluation.systems import SystemPair
from rmlib.specs import Registry


@dataclass(frozen=True)
class OrderPolicy:
    """A backfill order policy: `order(arrays, seed, train)` gives the permutation of the
    gallery of `arrays`. `seeded`: the seed changes it; `needs_train`: it learns from
    `train`, the same two systems on labelled training items (never the evaluation set);
    `privileged`: it reads what a deployment cannot (the new embeddings or the labels of the
    evaluation set), so it is a reference, not a policy to run. `summary`: one line for
    the command line's help."""

    name: str
    order: Callable[[SystemPair, int, SystemPair | None], np.ndarray]
    seeded: bool = False
    needs_train: bool = False
    privileged: bool = False
    summary: str = ""


ORDER_POLICIES = Registry("backfill order", ", or a file of gallery indices")


def register_order_policy(policy: OrderPolicy) -> OrderPolicy:
    """Add `policy` to `ORDER_POLICIES` (a name is registered once)."""
    return ORDER_POLICIES.register(policy)


def order_policy(name: str) -> OrderPolicy:
    """The registered policy `name`; an unknown one is an error."""
    return ORDER_POLICIES.spec(name)


def item_benefit(arrays: SystemPair, nearest_irrelevant: int = 10,
                 chunk: int = 1024) -> np.ndarray:
    """Per gallery item g, how much re-embedding it helps the merged ranking.

    When g is backfilled, its distance to a query q changes from the old system's
    d_old(q, g) to the new system's d_new(q, g), so g moves up for q by
    delta(q, g) = d_old(q, g) - d_new(q, g). Moving up helps for the queries relevant to g
    and hurts for the irrelevant ones that g is close to. The benefit is the mean delta
    over g's relevant queries minus the mean delta over its `nearest_irrelevant` closest
    irrelevant queries (closest by the smaller of the two distances). Items without a
    relevant query get only the second term.
    """
    protocol = arrays.protocol()
    old = EuclideanSystem.of(arrays.old_query, arrays.old_gallery)
    new = EuclideanSystem.of(arrays.new_query, arrays.new_gallery)
    n, k = protocol.num_gallery, nearest_irrelevant
    rel_sum = torch.zeros(n, dtype=torch.float64)
    rel_count = torch.zeros(n, dtype=torch.float64)
    near_dist = torch.full((k, n), float("inf"))  # the k closest irrelevant queries so far
    near_delta = torch.zeros(k, n)
    for start, stop in query_chunks(len(protocol.query_labels), chunk):
        d_old, d_new = old.distances(start, stop), new.distances(start, stop)
        delta = d_old - d_new
        relevant, excluded = protocol.masks(start, stop)
        rel_sum += (delta * relevant).sum(0, dtype=torch.float64)
        rel_count += relevant.sum(0, dtype=torch.float64)
        closeness = torch.minimum(d_old, d_new).masked_fill(relevant | excluded, float("inf"))
        dist = torch.cat([near_dist, closeness])
        kept = torch.topk(dist, k, dim=0, largest=False).indices
        near_dist = dist.gather(0, kept)
        near_delta = torch.cat([near_delta, delta]).gather(0, kept)
    found = torch.isfinite(near_dist)
    hurt = (near_delta * found).sum(0) / found.sum(0).clamp_min(1)
    helped = torch.where(rel_count > 0, rel_sum / rel_count.clamp_min(1), 0.0)
    return (helped - hurt.double()).numpy()


def order_by_priority(priority: np.ndarray) -> np.ndarray:
    """The backfill order of a priority per item: highest first, ties by item index."""
    priority = np.asarray(priority, dtype=np.float64)
    if priority.ndim != 1 or not np.isfinite(priority).all():
        raise RmlibError("a backfill priority must be one finite number per gallery item")
    return np.argsort(-priority, kind="stable")


class BenefitHead(nn.Module):
    """An item's old embedding -> its predicted benefit (standardised units)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def fit_benefit_head(old_embeddings: np.ndarray, benefit: np.ndarray, seed: int = 0,
                     epochs: int = 40, batch_size: int = 256, lr: float = 1e-3
                     ) -> BenefitHead:
    """Regress the benefit of training items on their old embeddings (mean squared error
    on standardised targets, Adam); the head then ranks items it has never seen."""
    x = torch.as_tensor(np.asarray(old_embeddings, dtype=np.float32))
    y = torch.as_tensor(np.asarray(benefit, dtype=np.float32))
    if len(x) != len(y) or len(x) < 2:
        raise RmlibError(f"the benefit head needs one target per item and at least 2 items, "
                         f"got {len(x)} embeddings and {len(y)} targets")
    y = (y - y.mean()) / y.std().clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # a seeded initialisation that leaves the caller's stream
        torch.manual_seed(seed)
        head = BenefitHead(x.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = nn.functional.mse_loss(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def predicted_benefit(head: BenefitHead, old_embeddings: np.ndarray) -> np.ndarray:
    return head(torch.as_tensor(np.asarray(old_embeddings, dtype=np.float32))).numpy()


def policy_order(policy: str, arrays: SystemPair, seed: int = 0,
                 train: SystemPair | None = None) -> np.ndarray:
    """The backfill order of the registered `policy` for the gallery of `arrays`; a policy
    that learns (`needs_train`) reads `train`, the same two systems built on training
    items, with their labels."""
    spec = order_policy(policy)
    if spec.needs_train:
        if train is None:
            raise RmlibError(f"the {policy} order learns from training items: pass their "
                             "systems as `train` (--order-train)")
        for side in ("old_gallery", "new_gallery"):
            got, want = getattr(train, side).shape[1], getattr(arrays, side).shape[1]
            if got != want:
                raise RmlibError(f"the training items' {side} has width {got} but the "
                                 f"evaluation file's has {want}; --order-train must hold the "
                                 "same two systems (the same models) on training items")
    return permutation(f"the {policy} order", spec.order(arrays, seed, train),
                       len(arrays.old_gallery))


def _uncertainty_order(arrays: SystemPair, seed: int, train: SystemPair | None
                       ) -> np.ndarray:
    head = fit_benefit_head(train.old_gallery, item_benefit(train), seed)
    return order_by_priority(predicted_benefit(head, arrays.old_gallery))


register_order_policy(OrderPolicy(
    "random", lambda arrays, seed, train: backfill_order(len(arrays.old_gallery), seed),
    seeded=True, summary="the paper's, seeded"))
register_order_policy(OrderPolicy(
    "uncertainty", _uncertainty_order, seeded=True, needs_train=True,
    summary="largest predicted benefit first, learned from --order-train"))
register_order_policy(OrderPolicy(
    "oracle", lambda arrays, seed, train: order_by_priority(item_benefit(arrays)),
    privileged=True, summary="measured with the new embeddings and labels: privileged, a "
    "reference"))


def load_order(path: Path | str, num_gallery: int) -> np.ndarray:
    """A user's own backfill order: a .npy integer array or a text file of one gallery
    index per line, each of the `num_gallery` items exactly once."""
    path = readable_file(path, "a backfill order (.npy, or text with one index per line)")
    try:
        with warnings.catch_warnings():  # an empty file: said below, in one line
            warnings.simplefilter("ignore")
            order = np.load(path) if path.suffix.lower() == ".npy" else \
                np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (OSError, ValueError, EOFError, MemoryError) as exc:
        raise RmlibError(f"{path} is not a backfill order ({exc}); give a .npy integer array "
                         "or a text file with one gallery index per line") from exc
    order = np.asarray(order)
    if order.size == 0:
        raise RmlibError(f"{path} is empty; a backfill order lists every gallery index "
                         f"0..{num_gallery - 1} once")
    return permutation(str(path), order, num_gallery)
