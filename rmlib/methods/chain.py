"""The upgrade chain: a third model ships while the first backfill is part-way.

M1 and M2 are Table 1's old and new models; M3 is a stronger net on all classes, the
better on held-out training images of two candidates (`third_candidates`: trained longer,
trained wider), each trained on the training images less that hold-out. The first
backfill (M1 -> M2, served by RM with Table 1's psi_21 and rho_2) has reached t1 of the
gallery when M3 arrives. Then, until every item carries an M3 embedding:

- finish first: RM_12 to t = 1, then a second backfill M2 -> M3 by two-system RM whose
  old space is rho_2(phi_2) (psi_32 and rho_3 by MCL, with Table 1's settings);
- restart: M3 re-embeds every item in its own order; the items it has not reached stay
  served by RM_12 (M2's query: psi_21 for M1's items, rho_2 for M2's), M3's by rho_3;
- 3-system naive: every part searched by its own model's raw query (the first backfill
  naive too);
- 3-system RM: M3's query serves every part, through psi_31 into M1's space (MCL from
  rho_3(phi_3) to phi_1), psi_32 into rho_2's, and rho_3 for its own items;
- 3-system RM, composed psi: the same with psi_21(psi_32(.)) for M1's items, no third
  transform.

The period runs from the first backfill's start, in units of N re-embeddings, to 2: the
end of finish-first's second backfill; the other strategies end at 1 + t1 and stay all-M3
from there. Each strategy gets its curve over the period, its AUC (the mean height over
[0, 2]), its negative flips against M1 (deployed before either upgrade) and its
re-embeddings per AUC point above M1; the chain's average compatibility
(`average_compatibility`) is given for each set of maps the strategies use.

Explained in the book: book/beyond_two.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from rmlib import RmlibError
from rmlib.config import Config
from rmlib.data import train_val_split
from rmlib.engine.backbones import BackboneConfig, TrainedModel
from rmlib.engine.embed import cached_embeddings
from rmlib.engine.transforms import Transforms
from rmlib.evaluation.backfill import (
    PartedSystem,
    backfill_order,
    backfilled_mask,
    simulate_backfill_systems,
)
from rmlib.evaluation.curves import BackfillCurve
from rmlib.evaluation.retrieval import EuclideanSystem, Protocol, evaluate
from rmlib.methods.experiment import Experiment
from rmlib.methods.reproduce import checked_study_path
from rmlib.outputs import write_json
from rmlib.provenance import provenance

T1_VALUES = (0.25, 0.5, 0.75)  # how far the first backfill is when M3 arrives
SECOND_ORDER = 1000  # the second backfill's order: backfill_order(N, SECOND_ORDER + seed)
HOLD_OUT_PER_CLASS = 50  # training images per class held out to choose M3
# M3's initialisation and batches: a seed no other backbone uses (old 0, new 1, and
# 2-5 for the backbone-seeds study), so that M3 shares no starting point with M2
THIRD_SEED = 10
THIRD_ROLE = f"third-less-{HOLD_OUT_PER_CLASS}-per-class"  # trained without the hold-out
STRATEGIES = ("finish first", "restart", "3-system naive", "3-system RM",
              "3-system RM, composed psi")
PERIOD = 2.0  # the period's length in units of N re-embeddings (finish-first's total)

# The searches the strategies are made of: (query, gallery) by which model and map.
SEARCHES = {
    "M1": "phi_1(q) against phi_1(g): the system deployed before either upgrade",
    "M2": "phi_2(q) against phi_2(g)",
    "M3": "phi_3(q) against phi_3(g)",
    "M1 by psi_21": "psi_21(rho_2(phi_2(q))) against phi_1(g): RM_12's old side",
    "M2 by rho_2": "rho_2(phi_2(q)) against rho_2(phi_2(g)): RM_12's new side",
    "M2 by psi_32": "psi_32(rho_3(phi_3(q))) against rho_2(phi_2(g)): RM_23's old side",
    "M3 by rho_3": "rho_3(phi_3(q)) against rho_3(phi_3(g)): RM_23's new side",
    "M1 by psi_31": "psi_31(rho_3(phi_3(q))) against phi_1(g)",
    "M1 by psi_21 psi_32": "psi_21(psi_32(rho_3(phi_3(q)))) against phi_1(g)",
    "M1 by phi_2": "phi_2(q) against phi_1(g) (no map)",
    "M1 by phi_3": "phi_3(q) against phi_1(g) (no map)",
    "M2 by phi_3": "phi_3(q) against phi_2(g) (no map)",
}
# For each set of maps and pair of models (i, j): model j's query searching model i's
# gallery through those maps, and model i's own search it must beat to be compatible.
CROSS_SEARCHES = {
    "naive": {"1-2": ("M1 by phi_2", "M1"), "1-3": ("M1 by phi_3", "M1"),
              "2-3": ("M2 by phi_3", "M2")},
    "composed": {"1-2": ("M1 by psi_21", "M1"), "1-3": ("M1 by psi_21 psi_32", "M1"),
                 "2-3": ("M2 by psi_32", "M2 by rho_2")},
    "direct": {"1-2": ("M1 by psi_21", "M1"), "1-3": ("M1 by psi_31", "M1"),
               "2-3": ("M2 by psi_32", "M2 by rho_2")},
}
MAP_SETS = {"naive": "no maps (raw embeddings)",
            "composed": "psi_21 and psi_32; M1 from M3 through both",
            "direct": "psi_21, psi_32 and psi_31"}
# The maps each strategy trains, and the cross-model searches it serves (pair "i-j": model
# j's query on model i's items): the naive merge serves none, restart only M2's query on
# M1's items, finishing first never puts M3's query on M1's items.
STRATEGY_MAPS = {"finish first": "composed", "restart": "composed", "3-system naive": "naive",
                 "3-system RM": "direct", "3-system RM, composed psi": "composed"}
SERVED_PAIRS = {"finish first": ("1-2", "2-3"), "restart": ("1-2",), "3-system naive": (),
                "3-system RM": ("1-2", "1-3", "2-3"),
                "3-system RM, composed psi": ("1-2", "1-3", "2-3")}


def third_candidates(new: BackboneConfig) -> dict[str, BackboneConfig]:
    """The two candidates for M3, from M2's config: half as many epochs again (the
    low-resolution share kept), or 1.25 times the width at M2's epochs; both from
    THIRD_SEED, not M2's seed (the same start would make M3 a near copy of M2's space)."""
    epochs = math.ceil(1.5 * new.epochs)
    # the role names the training subset, which the config's other fields do not
    third = replace(new, role=THIRD_ROLE, seed=THIRD_SEED)
    return {
        "longer": replace(third, epochs=epochs,
                          low_res_epochs=round(new.low_res_epochs * epochs / new.epochs)),
        "wider": replace(third, widths=tuple(round(1.25 * w) for w in new.widths)),
    }


def choose_third(exp: Experiment) -> tuple[TrainedModel, dict]:
    """Train both candidates on the training images less a stratified hold-out (the same
    50 per class, seed 0, as the transforms' validation split), and keep the one whose
    leave-one-out mAP on the held-out images is higher (never test images)."""
    setup = exp.setup
    per_class = min(HOLD_OUT_PER_CLASS,
                    max(2, int(np.bincount(setup.train.labels).min()) // 5))
    fit, held = train_val_split(setup.train.labels, per_class, seed=0)
    held_set = setup.train.subset(held)
    models, scores = {}, {}
    for name, config in third_candidates(setup.backbone_config("new")).items():
        t0 = time.time()
        models[name] = exp.fit_backbone(config, setup.train.subset(fit), setup.objective())
        exp.timings[f"backbone_third_{name}"] = time.time() - t0
        emb = cached_embeddings(models[name], held_set.images, f"{exp.dataset}-train-held-out",
                                views=setup.test_time_views, precision=exp.config.precision)
        scores[name] = evaluate(emb, emb, Protocol.leave_one_out(held_set.labels)
                                ).summary()["mAP"]
    chosen = max(scores, key=scores.get)
    return models[chosen], {
        "candidates": {n: asdict(m.config) for n, m in models.items()},
        "held_out_mAP": scores, "chosen": chosen, "fit_items": len(fit),
        "held_out_items": len(held),
        "train_seconds": {n: m.wall_time_s for n, m in models.items()}}


def chain_transforms(exp: Experiment, third: TrainedModel, seed: int
                     ) -> tuple[Transforms, Transforms, Transforms]:
    """(RM_12, RM_23, psi_31) of one seed: Table 1's psi_21 and rho_2; psi_32 and rho_3 by
    MCL from M3 towards rho_2(phi_2); psi_31 by MCL from rho_3(phi_3) to phi_1. All on the
    training items, with the settings Table 1 chose, cached by config."""
    t12 = exp.transform("mcl-rho", seed)
    chosen, labels = exp.settings(), exp.setup.train.labels
    third_train = third_embeddings(exp, third, "train")
    base = exp.transform_config("mcl", rho=True, hidden=chosen["hidden"],
                                epochs=chosen["epochs"], tau=chosen["tau"], seed=seed)
    t23 = exp.fit_transform(
        replace(base, sources=(f"{exp.model('new').run_dir.name}+rho:{t12.config.key()}",
                               third.run_dir.name)),
        t12.new_side(exp.embeddings("new", "train")), third_train, labels, exp.progress)
    t31 = exp.fit_transform(
        replace(base, rho=False, sources=(exp.model("old").run_dir.name,
                                          f"{third.run_dir.name}+rho:{t23.config.key()}")),
        exp.embeddings("old", "train"), t23.new_side(third_train), labels, exp.progress)
    return t12, t23, t31


def third_embeddings(exp: Experiment, third: TrainedModel, split: str) -> np.ndarray:
    """M3's embeddings of the training images (one view) or the test images (the
    profile's test-time views), cached beside the model as the others' are."""
    if split == "train":
        return cached_embeddings(third, exp.setup.train.images, f"{exp.dataset}-train",
                                 views="none", precision=exp.config.precision)
    return cached_embeddings(third, exp.setup.query.images, f"{exp.dataset}-test",
                             views=exp.setup.test_time_views, precision=exp.config.precision)


def chain_searches(exp: Experiment, third: TrainedModel,
                   transforms: tuple[Transforms, Transforms, Transforms]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every search of `SEARCHES` as its (query, gallery) embeddings of the test set."""
    t12, t23, t31 = transforms
    (q1, g1), (q2, g2) = exp.embedding_pair("old"), exp.embedding_pair("new")
    phi3 = third_embeddings(exp, third, "test")
    rho2_g, rho3 = t12.new_side(g2), t23.new_side(phi3)
    psi32 = t23.reverse(phi3)
    return {
        "M1": (q1, g1), "M2": (q2, g2), "M3": (phi3, phi3),
        "M1 by psi_21": (t12.reverse(q2), g1), "M2 by rho_2": (t12.new_side(q2), rho2_g),
        "M2 by psi_32": (psi32, rho2_g), "M3 by rho_3": (rho3, rho3),
        "M1 by psi_31": (t31.reverse(rho3), g1),
        "M1 by psi_21 psi_32": (t12.reverse_new_side(psi32), g1),
        "M1 by phi_2": (q2, g1), "M1 by phi_3": (phi3, g1), "M2 by phi_3": (phi3, g2),
    }


def average_compatibility(maps: str, scores: dict[str, float]) -> dict:
    """iamcl2r's average compatibility of the chain with a set of maps (`MAP_SETS`): the
    share of pairs of models i < j whose cross-model search (model j's query into model
    i's gallery through those maps) has a higher mAP than model i's own search. A
    property of the models and maps, not of a strategy: a strategy serves some of these
    searches (`SERVED_PAIRS`)."""
    pairs = {pair: {"cross_mAP": scores[cross], "own_mAP": scores[own],
                    "compatible": bool(scores[cross] > scores[own])}
             for pair, (cross, own) in CROSS_SEARCHES[maps].items()}
    return {"AC": sum(p["compatible"] for p in pairs.values()) / len(pairs),
            "maps": MAP_SETS[maps], "pairs": pairs}


def period_curve(first: BackfillCurve, t1: float, second: BackfillCurve,
                 finish: BackfillCurve | None = None) -> dict[str, list[float]]:
    """A strategy's curve over the period [0, PERIOD] in units of N re-embeddings: the first
    backfill to t1, then (finish first) the rest of it and the second backfill from 1, or
    the second backfill from t1, held at its end until PERIOD."""
    def points(curve: BackfillCurve, keep, shift: float) -> list[tuple]:
        return [(t + shift, curve.mAP[i], curve.top1[i], curve.nfr[i])
                for i, t in enumerate(curve.t) if keep(t)]

    if not any(abs(t - t1) < 1e-9 for t in first.t):
        raise ValueError(f"t1 = {t1} is not a point of the curves' grid")

    def every(t: float) -> bool:
        return True

    rows = points(first, lambda t: t <= t1 + 1e-9, 0.0)
    if finish is not None:
        rows += points(finish, lambda t: t >= t1 - 1e-9, 0.0) + points(second, every, 1.0)
    else:
        rows += points(second, every, t1)
    if rows[-1][0] < PERIOD - 1e-9:
        rows.append((PERIOD, *rows[-1][1:]))
    x, m, top1, nfr = (list(c) for c in zip(*rows, strict=True))
    return {"x": x, "mAP": m, "top1": top1, "nfr": nfr}


def period_auc(curve: dict, metric: str) -> float:
    """The mean height of a period curve over [0, PERIOD] (trapezoid rule)."""
    return float(np.trapezoid(curve[metric], curve["x"]) / PERIOD)


def _curve(old, new, protocol: Protocol, order: np.ndarray, reference: EuclideanSystem,
           device: torch.device) -> BackfillCurve:
    return simulate_backfill_systems(old, new, protocol, order, reference=reference,
                                     device=device)


def seed_curves(searches: dict, protocol: Protocol, seed: int, device: torch.device
                ) -> dict[float, dict[str, dict]]:
    """Every strategy's period curve for each t1, with the first backfill in seed's order
    (Table 1's) and the second in its own."""
    n = protocol.num_gallery
    sys = {name: EuclideanSystem.of(*pair, name).to(device) for name, pair in searches.items()}
    first_order, second_order = backfill_order(n, seed), backfill_order(n, SECOND_ORDER + seed)

    def curve(old, new, order):
        return _curve(old, new, protocol, order, sys["M1"], device)

    rm12 = curve(sys["M1 by psi_21"], sys["M2 by rho_2"], first_order)
    naive12 = curve(sys["M1"], sys["M2"], first_order)
    rm23 = curve(sys["M2 by psi_32"], sys["M3 by rho_3"], second_order)
    out = {}
    rho3 = sys["M3 by rho_3"]
    for t1 in T1_VALUES:
        in_m2 = backfilled_mask(first_order, t1).to(device)
        mixed = {name: PartedSystem(sys[m1], sys[m2], in_m2) for name, (m1, m2) in {
            "restart": ("M1 by psi_21", "M2 by rho_2"), "3-system naive": ("M1", "M2"),
            "3-system RM": ("M1 by psi_31", "M2 by psi_32"),
            "3-system RM, composed psi": ("M1 by psi_21 psi_32", "M2 by psi_32")}.items()}
        out[t1] = {
            "finish first": period_curve(rm12, t1, rm23, finish=rm12),
            "restart": period_curve(rm12, t1, curve(mixed["restart"], rho3, second_order)),
            "3-system naive": period_curve(naive12, t1, curve(mixed["3-system naive"],
                                                              sys["M3"], second_order)),
            **{name: period_curve(rm12, t1, curve(mixed[name], rho3, second_order))
               for name in ("3-system RM", "3-system RM, composed psi")},
        }
    return out


def re_embeddings(strategy: str, t1: float) -> float:
    """Items re-embedded over the period, in units of N: finishing first re-embeds the
    rest of the first backfill too."""
    return PERIOD if strategy == "finish first" else 1.0 + t1


def summarise(per_seed: list[dict], seeds: tuple[int, ...], old_mAP: float, n: int
              ) -> dict:
    """Mean and spread over seeds of each strategy's period curve and AUCs, for each t1."""
    out = {}
    for t1 in T1_VALUES:
        rows = {}
        for strategy in STRATEGIES:
            curves = [s[t1][strategy] for s in per_seed]
            row = {"x": curves[0]["x"], "seeds": list(seeds)}
            for metric in ("mAP", "top1", "nfr"):
                stack = np.array([c[metric] for c in curves])
                aucs = [period_auc(c, metric) for c in curves]
                row[metric] = stack.mean(0).tolist()
                row[f"{metric}_std"] = (stack.std(0, ddof=1) if len(curves) > 1
                                        else np.zeros(stack.shape[1])).tolist()
                row[f"auc_{metric}_seeds"] = aucs
                row[f"auc_{metric}"] = float(np.mean(aucs))
                row[f"auc_{metric}_std"] = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0
            above = 100 * (row["auc_mAP"] - old_mAP)
            row["re_embedded_N"] = re_embeddings(strategy, t1)
            row["re_embeddings"] = row["re_embedded_N"] * n
            row["re_embeddings_per_point"] = row["re_embeddings"] / above if above > 0 \
                else float("inf")
            row["maps"] = STRATEGY_MAPS[strategy]
            row["served_cross_searches"] = list(SERVED_PAIRS[strategy])
            rows[strategy] = row
        out[str(t1)] = rows
    return out


def chain(dataset: str, config: Config, progress: bool = False) -> dict:
    """The upgrade chain on CIFAR-100 (see the module's docstring); writes chain.json."""
    if dataset != "cifar100":
        raise RmlibError(f"the upgrade-chain study is defined on cifar100, not {dataset!r}")
    start = time.time()
    out = checked_study_path(dataset, config, "chain")
    exp = Experiment(dataset, config, progress)
    third, selection = choose_third(exp)
    protocol, device = exp.setup.protocol, config.torch_device
    seeds = tuple(config.profile.transforms.seeds)
    per_seed, searches_mAP = [], {}
    for seed in seeds:
        t0 = time.time()
        searches = chain_searches(exp, third, chain_transforms(exp, third, seed))
        exp.timings[f"chain_transforms@seed{seed}"] = time.time() - t0
        t0 = time.time()
        per_seed.append(seed_curves(searches, protocol, seed, device))
        for name, pair in searches.items():
            searches_mAP.setdefault(name, []).append(evaluate(*pair, protocol).summary()["mAP"])
        exp.timings[f"chain_evaluation@seed{seed}"] = time.time() - t0
    scores = {name: float(np.mean(v)) for name, v in searches_mAP.items()}
    maps_ac = {maps: average_compatibility(maps, scores) for maps in CROSS_SEARCHES}
    result = {
        "t1": summarise(per_seed, seeds, scores["M1"], protocol.num_gallery),
        "average_compatibility": maps_ac,
        "searches": {name: {"mAP": scores[name], "mAP_seeds": searches_mAP[name],
                            "what": SEARCHES[name]} for name in SEARCHES},
        "third_model": {**selection, "test_mAP": scores["M3"]},
        "provenance": provenance(
            {"strategies": list(STRATEGIES), "t1_values": list(T1_VALUES),
             "seeds": list(seeds), "period": f"0 to {PERIOD} in units of N re-embeddings",
             "second_order": f"backfill_order(N, {SECOND_ORDER} + seed)",
             "hyperparameter_selection": exp.selection,
             "transforms": "Table 1's settings for psi_32, rho_3 and psi_31 (MCL)"},
            time.time() - start, commit=config.commit, profile=config.name)}
    result["provenance"]["step_seconds"] = exp.timings
    write_json(out, result)
    return result
