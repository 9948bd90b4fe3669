"""Every row of Table 1 and every step of the ablation: one entry each, in one place.

A method is two retrieval systems over the same gallery, built from the experiment's
backbones and transforms: the old side (queries against the not-yet-backfilled gallery)
and the new side (queries against the backfilled items). Adding a method is one entry
here (and its test); the paper's numbers are in `paper_table1.json` beside this file.

Explained in the book: book/table1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rmlib.evaluation.systems import SystemPair, centred
from rmlib.methods.experiment import Experiment
from rmlib.methods.selection import rm_systems

Systems = Callable[[Experiment, int], SystemPair]


@dataclass(frozen=True)
class Method:
    """One row: its name, how it builds its two systems for a seed, and what they are in
    words. What a row needs (backbones, transforms, calibrations) is built lazily by the
    `Experiment` the first time `systems` asks for it, and cached: a runner evaluating a
    subset of rows builds only what those rows touch, and no list of needs can go stale.

    `seeded`: its systems or its merge depend on the seed (the backfill order, and the
    initialisation and batches of its transforms), so it is run with every seed of the
    profile; else once. `calibration`: the maps of each system's distances to the scores
    the merge compares (default: the distances). `same_as` names a row with the same
    systems (evaluated once).
    """

    name: str
    systems: Systems
    note: str
    seeded: bool = True
    calibration: Callable[[Experiment, int], tuple] | None = None
    same_as: str | None = None


def _reverse_transform(name: str) -> Systems:
    """The RM systems of a fitted psi (and rho): {psi(rho(phi_new(q))), phi_old(g)} and
    {rho(phi_new(q)), rho(phi_new(g))}."""
    return lambda e, seed: rm_systems(e.transform(name, seed), e.naive())


def _forward_gallery(backbone: str, transform: str, seeded: bool = True,
                     towards: str = "new") -> Systems:
    """FCT / BiCT: the old gallery upgraded by h (fitted towards the `towards` model),
    searched by `backbone`'s queries. Unseeded: h of seed 0 whatever the seed (BiCT's
    upgrade-first h' is the one its backbone was trained against)."""
    def systems(e: Experiment, seed: int) -> SystemPair:
        q, g = e.embedding_pair(backbone)
        h = e.transform(transform, seed if seeded else 0, towards)
        return e.systems(q, h.forward(e.embedding_pair("old")[1]), q, g)
    return systems


def _backward_compatible(backbone: str) -> Systems:
    """BCT: the new backbone's queries search the old gallery, then its own embeddings."""
    return lambda e, s: e.systems(e.embedding_pair(backbone)[0], e.embedding_pair("old")[1],
                                  *e.embedding_pair(backbone))


def _centred(old: str, new: str, systems: Systems) -> Systems:
    """`systems` with the old side centred on the `old` backbone's training mean and the
    new side on the `new` backbone's, each re-normalised (`centred`)."""
    return lambda e, seed: centred(systems(e, seed), e.centre(old), e.centre(new))


def _upgraded_model(e: Experiment, seed: int) -> SystemPair:
    """rho(phi_new) alone for queries and gallery: the better model without any merge."""
    rho = e.transform("mcl-rho", seed)
    q, g = (rho.new_side(x) for x in e.embedding_pair("new"))
    return e.systems(q, g, q, g)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("Old", lambda e, s: e.systems(*e.embedding_pair("old"), *e.embedding_pair("old")),
           "phi_old / phi_old, no backfill", seeded=False),
    Method("New", lambda e, s: e.systems(*e.embedding_pair("new"), *e.embedding_pair("new")),
           "phi_new / phi_new, fully backfilled", seeded=False),
    Method("RM_naive", lambda e, s: e.naive(),
           "rank merge of old/old and new/new"),
    Method("BCT", _backward_compatible("bct"),
           "phi_bct / phi_old, then phi_bct; influence on every class (synthesised "
           "classifier), plain cross-entropy, weight 1"),
    Method("FCT", _forward_gallery("new", "fct"),
           "phi_new / h(phi_old), no side-information; our recipe (see the baselines chapter)"),
    Method("BiCT", _forward_gallery("bct", "bict-forward", towards="bct"),
           "phi_bct / h(phi_old), then phi_bct: BCT's model, then the old gallery upgraded "
           "towards it (regression + its classifier)"),
    Method("RM", _reverse_transform("mcl-rho"),
           "psi(rho(phi_new)) / phi_old, then rho(phi_new)"),
    Method("New+rho", _upgraded_model,
           "rho(phi_new) / rho(phi_new): the upgraded model alone, fully backfilled"),
    Method("RM_naive+cal", lambda e, s: e.naive(),
           "rank merge of old/old and new/new by P(relevant | distance), each system "
           "calibrated by isotonic regression on training pairs",
           calibration=lambda e, s: e.calibrations(s)),
    Method("+RQT", _reverse_transform("rqt"),
           "psi_rqt(phi_new) / phi_old, then phi_new"),
    Method("+CL", _reverse_transform("cl"),
           "psi_cl(phi_new) / phi_old, then phi_new"),
    Method("+MCL", _reverse_transform("mcl"),
           "psi_mcl(phi_new) / phi_old, then phi_new"),
    Method("+rho", _reverse_transform("mcl-rho"),
           "psi(rho(phi_new)) / phi_old, then rho(phi_new)", same_as="RM"),
    Method("BCT, old classes only", _backward_compatible("bct-old-classes"),
           "phi_bct' / phi_old, then phi_bct': influence on the old classes only, smoothed "
           "as the backbone"),
    Method("BiCT, regression only", _forward_gallery("bct", "fct", False, "bct"),
           "phi_bct / h(phi_old), then phi_bct: h by regression alone (one run)", seeded=False),
    Method("BiCT, classifier only", _forward_gallery("bct", "bict-forward-cls", False, "bct"),
           "phi_bct / h(phi_old), then phi_bct: h by the classifier term alone (one run)",
           seeded=False),
    Method("BiCT, upgrade first", _forward_gallery("bict-upgrade-first", "bict", False),
           "phi_bict / h'(phi_old), then phi_bict: h' first, then a model compatible with it",
           seeded=False),
    Method("Old, centred", _centred("old", "old", lambda e, s: e.systems(
        *e.embedding_pair("old"), *e.embedding_pair("old"))),
        "phi_old / phi_old, centred on its training mean", seeded=False),
    Method("New, centred", _centred("new", "new", lambda e, s: e.systems(
        *e.embedding_pair("new"), *e.embedding_pair("new"))),
        "phi_new / phi_new, centred on its training mean", seeded=False),
    Method("RM_naive, centred", _centred("old", "new", lambda e, s: e.naive()),
           "rank merge of old/old and new/new, each system centred on its own training "
           "mean and re-normalised"),
    Method("psi Procrustes", _reverse_transform("procrustes"),
           "psi(phi_new) / phi_old, then phi_new: psi an orthogonal map, by SVD of the "
           "training pairs (closed form)"),
    Method("psi Procrustes+cal", _reverse_transform("procrustes"),
           "as psi Procrustes, merged by P(relevant | distance), each system calibrated on "
           "training pairs (the old one on psi-mapped new queries)",
           calibration=lambda e, s: e.calibrations(s, psi="procrustes")),
    Method("psi affine", _reverse_transform("affine"),
           "psi(phi_new) / phi_old, then phi_new: psi the least-squares affine map of the "
           "training pairs (closed form)"),
    Method("psi affine+cal", _reverse_transform("affine"),
           "as psi affine, merged by P(relevant | distance), each system calibrated on "
           "training pairs (the old one on psi-mapped new queries)",
           calibration=lambda e, s: e.calibrations(s, psi="affine")),
    Method("FCT, ml-fct recipe", _forward_gallery("new", "fct-mlfct", False),
           "phi_new / h(phi_old): apple/ml-fct's MLP, MSE, learning rate, weight decay, "
           "epochs and batch size, on cached embeddings, with rmlib's AdamW and one-cycle "
           "schedule (one run)", seeded=False),
)}

# The paper's rows, then two references of ours: the upgraded model alone (how much of
# RM's result is the better model rather than the merge) and a training-free calibration.
TABLE1_ROWS = ("Old", "New", "RM_naive", "BCT", "FCT", "BiCT", "RM", "New+rho", "RM_naive+cal")
ABLATION_ROWS = ("RM_naive", "+RQT", "+CL", "+MCL", "+rho")
# Each system centred on its own training mean: the convention that removes the cone
# (book/rank_merge); `centring_decision` says whether every row should use it.
CENTRING_ROWS = ("Old, centred", "New, centred", "RM_naive, centred")
# The baselines as published beside the variants the book measures them against.
# Closed-form query transforms beside the trained ones (book/beyond_two): no epochs, no labels.
CLOSED_FORM_ROWS = ("RM_naive", "RM_naive+cal", "psi Procrustes", "psi Procrustes+cal",
                    "psi affine", "psi affine+cal", "+RQT", "+CL", "+MCL", "RM")
BASELINE_ROWS = ("BCT", "BCT, old classes only", "BiCT", "BiCT, regression only",
                 "BiCT, classifier only", "BiCT, upgrade first", "FCT", "FCT, ml-fct recipe")


@cache
def paper_table1() -> dict[str, dict[str, list[float]]]:
    """The paper's Table 1 per data set: row -> [AUC_mAP, AUC_CMC, Gain] in %."""
    text = (Path(__file__).with_name("paper_table1.json")).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@cache
def external_results() -> dict[str, dict]:
    """Other papers' numbers, for context beside the studies (`external_results.json`):
    each entry's source, protocol, metric and rows; other protocols and single runs."""
    text = (Path(__file__).with_name("external_results.json")).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
