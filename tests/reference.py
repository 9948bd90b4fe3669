"""An independent, deliberately plain evaluator: one query at a time, a full stable sort,
scikit-learn's average precision. Slow by design; the oracle for rmlib's fast evaluator
(tests) and the baseline of its benchmark."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score


def distance_row(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.sqrt(((g.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1))


def scored_items(i: int, qlab, glab, self_excluded: bool = False, qcam=None, gcam=None):
    """Which gallery items query i is ranked against (not itself when it is in the
    gallery, not its own identity seen by its own camera), and which of those are
    relevant to it."""
    keep = np.ones(len(glab), bool)
    if self_excluded:
        keep[i] = False
    if qcam is not None:
        keep &= ~((glab == qlab[i]) & (gcam == qcam[i]))
    return keep, (glab == qlab[i])[keep]


def reference_curve(oq, og, nq, ng, qlab, glab=None, qcam=None, gcam=None, ref_q=None,
                    order=None, ts=None, seed=0, self_excluded=False, parted=None):
    """Returns dict of lists: mAP, top1, top5, nfr at each t (fractions).

    Without glab the gallery is the query set (leave-one-out); with self_excluded, query i
    is gallery item i and is removed from its own ranking. `parted` = (oq2, og2, in_second):
    the not-yet-backfilled items in `in_second` are scored by oq2 against og2 instead.
    """
    loo = glab is None or self_excluded
    glab = qlab if glab is None else glab
    n = len(glab)
    order = np.random.default_rng(seed).permutation(n) if order is None else order
    ts = np.linspace(0, 1, 21) if ts is None else ts
    ref_q = oq if ref_q is None else ref_q
    out = {"mAP": [], "top1": [], "top5": [], "nfr": []}
    for t in ts:
        m = int(math.floor(round(t * n, 6)))
        newmask = np.zeros(n, bool)
        newmask[order[:m]] = True
        aps, t1, t5, nf = [], [], [], []
        for i in range(len(qlab)):
            d_old = distance_row(oq[i], og)
            if parted is not None:
                d_old = np.where(parted[2], distance_row(parted[0][i], parted[1]), d_old)
            d_new = distance_row(nq[i], ng)
            d = np.where(newmask, d_new, d_old)
            keep, rel = scored_items(i, qlab, glab, loo, qcam, gcam)
            if not rel.any():
                continue
            dk = d[keep]
            aps.append(average_precision_score(rel, -dk))
            ranking = np.argsort(dk, kind="stable")
            t1.append(rel[ranking[0]])
            t5.append(rel[ranking[:5]].any())
            dref = distance_row(ref_q[i], og)[keep]
            ref_ok = rel[np.argsort(dref, kind="stable")[0]]
            nf.append(ref_ok and not rel[ranking[0]])
        out["mAP"].append(float(np.mean(aps)))
        out["top1"].append(float(np.mean(t1)))
        out["top5"].append(float(np.mean(t5)))
        out["nfr"].append(float(np.mean(nf)))
    return out
