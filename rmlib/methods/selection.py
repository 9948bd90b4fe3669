"""Choosing on held-out training items: the settings of psi/rho, and whether every row
centres its embeddings; and the RM systems.

Every choice (tau, the width, the epochs) maximises one score: the AUC_mAP of the simulated
online backfill of the RM systems on a held-out split of the *training* items. The test
set is never used.

Explained in the book: book/mcl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from rmlib.engine.transforms import TransformConfig, Transforms, fit_transforms
from rmlib.evaluation.backfill import backfill_arrays
from rmlib.evaluation.retrieval import Protocol, evaluate
from rmlib.evaluation.systems import SystemPair, centred


def rm_systems(t: Transforms, arrays: SystemPair) -> SystemPair:
    """The RM systems from the naive ones: {psi(rho(new_q)), old_g} and {rho(new_q), rho(new_g)}.

    Negative flips stay defined against the deployed old system (reference_query, else the
    naive file's old_query, on its reference_gallery, else its old_gallery, which RM keeps).
    """
    reference = arrays.reference_side()[0]
    return SystemPair(
        old_query=t.reverse(arrays.new_query), old_gallery=arrays.old_gallery,
        new_query=t.new_side(arrays.new_query), new_gallery=t.new_side(arrays.new_gallery),
        query_labels=arrays.query_labels, gallery_labels=arrays.gallery_labels,
        query_cams=arrays.query_cams, gallery_cams=arrays.gallery_cams,
        reference_query=reference, reference_gallery=arrays.reference_gallery)


def validation_auc(config: TransformConfig, old: np.ndarray, new: np.ndarray,
                   labels: np.ndarray, fit: np.ndarray, val: np.ndarray,
                   fit_fn: Callable[..., Transforms] = fit_transforms, progress: bool = True
                   ) -> float:
    """AUC_mAP of the simulated backfill of the RM systems on held-out items `val`, with
    transforms of `config` trained on `fit`: the one score every choice here maximises."""
    t = fit_fn(config, old[fit], new[fit], labels[fit], progress=progress)
    naive = SystemPair(old[val], old[val], new[val], new[val], labels[val])
    return backfill_arrays(rm_systems(t, naive))[0].auc("mAP")


def select_settings(base: TransformConfig, old: np.ndarray, new: np.ndarray,
                    labels: np.ndarray, fit: np.ndarray, val: np.ndarray, *,
                    taus: Sequence[float], tau_epochs: int | None = None,
                    widths: Sequence[int] = (), epochs: Sequence[int] = (),
                    fit_fn: Callable[..., Transforms] = fit_transforms, progress: bool = True
                    ) -> dict:
    """tau, then the width of psi/rho, then their epochs, each by `validation_auc`.

    A coordinate search, cheapest first: tau with short fits (`tau_epochs`), the width at
    that tau with short fits too, then the epochs at that width. An empty grid keeps
    `base`'s value. Never looks at a test set.
    """
    scores: dict[str, float] = {}

    def score(cfg: TransformConfig) -> float:
        if cfg.key() not in scores:
            scores[cfg.key()] = validation_auc(cfg, old, new, labels, fit, val, fit_fn, progress)
        return scores[cfg.key()]

    short = replace(base, epochs=tau_epochs or base.epochs)
    by_tau = {tau: score(replace(short, tau=tau)) for tau in taus}
    best = replace(base, tau=max(by_tau, key=by_tau.get))
    by_width = {w: score(replace(short, tau=best.tau, hidden=w)) for w in widths}
    if by_width:
        best = replace(best, hidden=max(by_width, key=by_width.get))
    by_epochs = {e: score(replace(best, epochs=e)) for e in epochs}
    if by_epochs:
        best = replace(best, epochs=max(by_epochs, key=by_epochs.get))
    return {"tau": best.tau, "hidden": best.hidden, "epochs": best.epochs,
            "val_auc_mAP": by_tau, "val_auc_mAP_by_hidden": by_width,
            "val_auc_mAP_by_epochs": by_epochs, "tau_epochs": short.epochs,
            "val_items": len(val), "fit_items": len(fit),
            "validation_score": max((by_epochs or by_width or by_tau).values())}


# How far centring may move a model's own validation mAP and still count as a convention
# that leaves each system as it was (fixed before any measurement).
CENTRING_TOLERANCE = 0.005
CENTRING_RULE = ("every row centres its embeddings if centring moves neither the old nor "
                 "the new model's own validation mAP by more than half a point and raises "
                 "RM_naive's validation AUC mAP; otherwise the centred rows stand on their own")


def centring_decision(old: np.ndarray, new: np.ndarray, labels: np.ndarray,
                      fit: np.ndarray, val: np.ndarray) -> dict:
    """`CENTRING_RULE` applied on held-out training items: each model's centre is the mean
    of its embeddings of the `fit` items, and the scores are those of the `val` items
    (leave-one-out; the random backfill order of seed 0): the old and the new model's own
    mAP and RM_naive's AUC mAP, raw and centred. Never looks at a test set."""
    raw = SystemPair(old[val], old[val], new[val], new[val], labels[val])
    moved = centred(raw, old[fit].mean(axis=0), new[fit].mean(axis=0))
    protocol = Protocol.leave_one_out(labels[val])
    scores = {}
    for name, pair in (("raw", raw), ("centred", moved)):
        scores[name] = {
            "old_mAP": evaluate(pair.old_query, pair.old_gallery, protocol).summary()["mAP"],
            "new_mAP": evaluate(pair.new_query, pair.new_gallery, protocol).summary()["mAP"],
            "rm_naive_auc_mAP": backfill_arrays(pair)[0].auc("mAP")}
    alone = all(abs(scores["centred"][k] - scores["raw"][k]) <= CENTRING_TOLERANCE
                for k in ("old_mAP", "new_mAP"))
    helps = scores["centred"]["rm_naive_auc_mAP"] > scores["raw"]["rm_naive_auc_mAP"]
    return {**scores, "rule": CENTRING_RULE, "validation_items": int(len(val)),
            "decision": "every row" if alone and helps else "rows of their own"}

