"""The paper's objectives and the baselines', as functions of embeddings and labels.

- eq. 9, RQT: dist(psi(phi_new(x)), phi_old(x)), pulling each reverse-transformed query onto
  the old embedding of the same image;
- eq. 10, CL: supervised contrastive loss of the backward system {phi_rev, phi_old} with
  hard mining (footnote 2: per anchor, the harder half of its positives and of its
  negatives);
- eq. 11, MCL: CL of both systems where each also counts the *other* system's negatives in
  its denominator, so that distances of the two systems become comparable;
- eq. 12-13: the same with rho_new = rho(phi_new) and rho_rev = psi(rho(phi_new));
- BCT's influence loss and FCT's old-to-new regression.

Similarities are s = exp(-dist / tau); the sums of eq. 10-11 are computed as logsumexp
over masked logits (the plain sums underflow). Distances go through a clamped square root:
the gradient of sqrt at 0 is infinite, and a system's own diagonal is exactly 0.

Explained in the book: book/rqt, book/mcl, book/rho, book/baselines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances (A, B) with a finite gradient everywhere (clamp before the root)."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return sq.clamp_min(eps).sqrt()


def mean_distance_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean Euclidean distance between paired rows.

    eq. 9 (RQT): x = psi(phi_new(x)), target = phi_old(x). FCT's regression (Ramanujan et
    al. 2022, without side-information): x = h(phi_old(x)), target = phi_new(x).
    """
    return (x - target).pow(2).sum(1).clamp_min(1e-12).sqrt().mean()


def hardest_half(dist: torch.Tensor, mask: torch.Tensor, hardest: str) -> torch.Tensor:
    """Keep, in each row, the harder half (rounded up) of the items in `mask`.

    Hard positives are the farthest (`hardest="far"`), hard negatives the closest ("near").
    A partial sort (top-k, k = the largest half) gives each row's cut-off distance: a full
    sort of every row costs three times as much and mining runs on every step. On an
    accelerator k is the static bound (half a row), so that mining never waits for a read.
    """
    far = hardest == "far"
    keep = (mask.sum(1, keepdim=True) + 1) // 2
    if on_host(dist):
        k = int(keep.max())  # the smallest top-k that serves every row
        if k == 0:
            return torch.zeros_like(mask)
    else:  # a bound known without reading the device: no row keeps more than half its items
        k = (mask.shape[1] + 1) // 2
    score = dist.masked_fill(~mask, float("-inf") if far else float("inf"))
    top = torch.topk(score, k, dim=1, largest=far, sorted=True).values
    cut = top.gather(1, (keep - 1).clamp_min(0))
    chosen = dist >= cut if far else dist <= cut
    return mask & chosen  # a row with nothing to keep has an empty mask already


def mined_pairs(dist: torch.Tensor, labels: torch.Tensor, mine: bool, exclude_self: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's positives and negatives in `dist` (anchors x items of one system):
    same label (minus the anchor itself with `exclude_self`) and different label, the
    harder half of each when mining (footnote 2)."""
    same = labels[:, None] == labels[None, :]
    pos, neg = same, ~same
    if exclude_self:
        pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=dist.device)
    if mine:
        pos = hardest_half(dist.detach(), pos, "far")
        neg = hardest_half(dist.detach(), neg, "near")
    return pos, neg


def log_similarity_sum(dist: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row i, log sum_{k in mask_i} s_ik with s_ik = exp(-dist_ik / tau).

    One sum of eq. 10-11, in log space: logsumexp over the masked logits -dist / tau. The
    plain sum of exponentials underflows for small tau. An empty row gives -inf (log 0).
    """
    return torch.logsumexp((-dist / tau).masked_fill(~mask, NEG_INF), 1)


def on_host(x: torch.Tensor) -> bool:
    """Whether reading a value of `x` is free (the CPU); an accelerator waits for it."""
    return x.device.type == "cpu"


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean of values[keep] (0 when nothing is kept), without a shape that depends on
    the data on an accelerator (a boolean index reads the device); on the CPU exactly
    values[keep].mean(), so cached results stay bit-identical."""
    if on_host(values):
        return values[keep].mean() if bool(keep.any()) else values.sum() * 0.0
    return torch.where(keep, values, 0.0).sum() / keep.sum().clamp_min(1)


def contrastive_terms(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                      extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-anchor -log(sum_pos s / (sum_pos s + sum_neg s [+ sum_extra_neg s])).

    `dist` (B, B): anchors x items of one system, with its `pos`/`neg` masks (`mined_pairs`);
    `extra`: the other system's distances and negatives, which join the denominator (eq. 11).
    Anchors without a positive are left out.
    """
    terms, valid = _all_anchor_terms(dist, pos, neg, tau, extra)
    return terms[valid]


def contrastive_mean(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                     extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`contrastive_terms(...).mean()`, computed without reading the device."""
    return masked_mean(*_all_anchor_terms(dist, pos, neg, tau, extra))


def _all_anchor_terms(dist, pos, neg, tau, extra) -> tuple[torch.Tensor, torch.Tensor]:
    sums = [log_similarity_sum(dist, pos, tau), log_similarity_sum(dist, neg, tau)]
    if extra is not None:
        other, other_neg = extra
        sums.append(log_similarity_sum(other, other_neg, tau))
    numerator = sums[0]
    denominator = torch.logsumexp(torch.stack(sums, 1), dim=1)  # log of the sum of the sums
    return denominator - numerator, pos.any(1)


def cl_loss(rev: torch.Tensor, old: torch.Tensor, labels: torch.Tensor, tau: float = 1.0,
            mine: bool = True) -> torch.Tensor:
    """eq. 10: supervised contrastive loss of the backward system {rev, old}.

    The anchor is rev(x_i); its positives are old(x_k) with y_k = y_i, including k = i
    (the image's own old embedding, the pair that eq. 9 pulls together).
    """
    dist = pairwise_distances(rev, old)
    return contrastive_mean(dist, *mined_pairs(dist, labels, mine, exclude_self=False), tau)


def mcl_loss(rev: torch.Tensor, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor,
             tau: float = 1.0, mine: bool = True) -> torch.Tensor:
    """eq. 11 (and eq. 12-13 when `new` is rho(phi_new) and `rev` is psi(rho(phi_new))).

    Term 1: backward system {rev, old}, with the new system's negatives added to its
    denominator; term 2: new system {new, new} (self pairs excluded), with the backward
    system's negatives added. Each system's pairs are mined once and used in both terms.
    """
    d_old = pairwise_distances(rev, old)
    d_new = pairwise_distances(new, new)
    pos_old, neg_old = mined_pairs(d_old, labels, mine, exclude_self=False)
    pos_new, neg_new = mined_pairs(d_new, labels, mine, exclude_self=True)
    backward = contrastive_mean(d_old, pos_old, neg_old, tau, extra=(d_new, neg_new))
    forward = contrastive_mean(d_new, pos_new, neg_new, tau, extra=(d_old, neg_old))
    return backward + forward


def bct_influence_loss(new_embedding: torch.Tensor, labels: torch.Tensor,
                       old_classifier: torch.nn.Module, num_old_classes: int,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """BCT (Shen et al. 2020): new embeddings through the frozen old classifier, on the
    items of the old classes."""
    keep = labels < num_old_classes
    if on_host(labels):
        if not keep.any():
            return new_embedding.sum() * 0.0
        logits = old_classifier(new_embedding[keep])
        return F.cross_entropy(logits, labels[keep], label_smoothing=label_smoothing)
    # on an accelerator: every item through the classifier, the new classes' terms masked
    logits = old_classifier(new_embedding)
    terms = F.cross_entropy(logits, torch.where(keep, labels, 0), reduction="none",
                            label_smoothing=label_smoothing)
    return masked_mean(terms, keep)


def batch_hard_triplet_loss(embedding: torch.Tensor, labels: torch.Tensor,
                            margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017): per anchor, its farthest positive
    and nearest negative in the batch; anchors without either are skipped."""
    dist = pairwise_distances(embedding, embedding)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=dist.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(1)
    return masked_mean(F.relu(hardest_pos - hardest_neg + margin), valid)
