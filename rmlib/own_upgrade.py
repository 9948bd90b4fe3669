"""Your own upgrade: fit psi (and rho) with MCL on your embeddings, and apply them.

`fit` trains on TRAIN.npz (arrays old, new, labels: old and new embeddings of the same
labelled training items) exactly as the CIFAR-100 recipe does: tau chosen by the backfill
AUC_mAP on a held-out split of those items (unless given), then the transforms retrained on
all of them. `apply` turns an evaluation file (EMB.npz) into the RM system's arrays.

The transforms live on the unit sphere, as the paper's do: psi and rho output unit
vectors, and MCL compares them with old embeddings. So both commands L2-normalise every
embedding they read (`unit_rows`); without it, embeddings of norm 20 would be merged with
unit-length ones and the old part would win or lose every comparison (AUC mAP 7 instead of
66 in the test). COMPAT.pt records the convention (`unit_inputs`).

`fit --centre` also moves each system by its own mean over the training items and
normalises again (`rmlib.evaluation.systems.centred`, book/rank_merge): COMPAT.pt records
both centres, and `apply` moves the evaluation file's embeddings by the same ones.

Explained in the book: book/own_upgrade.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rmlib import RmlibError
from rmlib.config import TransformRecipe, profile
from rmlib.data import train_val_split
from rmlib.engine.transforms import (
    TransformConfig,
    Transforms,
    build_transforms,
    fit_transforms,
)
from rmlib.evaluation.emb_file import load_npz, readable_file
from rmlib.evaluation.systems import SystemPair, centred, embedding_array
from rmlib.methods.selection import rm_systems, select_settings
from rmlib.outputs import save_torch

FORMAT = "rmlib-compat-2"  # 2: the centres; a file of format 1 loads as not centred
FORMATS = ("rmlib-compat-1", FORMAT)
METHODS = ("mcl", "procrustes", "affine")  # what `fit --method` fits: MCL, or a closed form
CLOSED_FORMS = METHODS[1:]
MIN_MEAN_COSINE = 0.3  # below this, embeddings look like another model's


# The hold-out that chooses tau scores a leave-one-out backfill on its items: each held-out
# item needs another of its label there to be a valid query, and the fit needs positives too.
MIN_PER_LABEL_FIT = 2
MIN_HELD_OUT_PER_LABEL = 2
MIN_PER_LABEL_SELECT = MIN_PER_LABEL_FIT + MIN_HELD_OUT_PER_LABEL


def load_training_file(path: Path | str, selects: bool = True, contrasts: bool = True
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """old, new, labels from TRAIN.npz, validated: one clear RmlibError for any problem.

    `selects`: settings will be chosen on a hold-out, which needs more items per label;
    `contrasts`: the fit contrasts items of a label (MCL), which needs two per label (a
    closed-form map reads no labels).
    """
    found = load_npz(path, required=("old", "new", "labels"))
    old, new = embedding_array("old", found["old"]), embedding_array("new", found["new"])
    labels = np.asarray(found["labels"])
    if len(new) != len(old):
        raise RmlibError(f"new has {len(new)} rows but old has {len(old)}; both must embed "
                         "the same training items in the same order")
    if labels.shape != (len(old),) or not np.issubdtype(labels.dtype, np.integer):
        raise RmlibError(f"labels must be {len(old)} integers, one per item; got "
                         f"{labels.dtype}{labels.shape}")
    if not contrasts:
        return old.astype(np.float32), new.astype(np.float32), labels.astype(np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise RmlibError("labels hold a single class; MCL needs at least 2 classes")
    need = MIN_PER_LABEL_SELECT if selects else MIN_PER_LABEL_FIT
    if (counts < need).any():
        why = (f"choosing the settings on a hold-out needs {need} per label "
               f"({MIN_HELD_OUT_PER_LABEL} held out, {MIN_PER_LABEL_FIT} to fit); give --tau "
               f"(without --search-size) to need only {MIN_PER_LABEL_FIT}" if selects
               else f"MCL needs {need} per label (an item and a positive)")
        raise RmlibError(f"{int((counts < need).sum())} label(s) have fewer than {need} items; "
                         f"{why}, or drop those items")
    return old.astype(np.float32), new.astype(np.float32), labels.astype(np.int64)


UNIT_TOLERANCE = 1e-3  # |norm - 1| within this counts as unit length already


def unit_rows(name: str, a: np.ndarray) -> np.ndarray:
    """`a` with every row scaled to unit length (float32); a zero row is an error."""
    a = np.asarray(a, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms == 0).any():
        rows = np.flatnonzero(norms[:, 0] == 0)
        raise RmlibError(f"{name} has {len(rows)} all-zero row(s) (e.g. row {rows[0]}), which "
                         "have no direction; re-extract those embeddings")
    return (a / norms).astype(np.float32)


def is_unit(a: np.ndarray) -> bool:
    """Whether every row of `a` has unit length already (within `UNIT_TOLERANCE`)."""
    norms = np.linalg.norm(np.asarray(a, dtype=np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1) <= UNIT_TOLERANCE))


def holdout(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified hold-out of 10% of each label (at least `MIN_HELD_OUT_PER_LABEL`, so
    that every held-out item has a relevant item to find) for choosing the settings."""
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    return train_val_split(labels, max(MIN_HELD_OUT_PER_LABEL, int(counts.min()) // 10),
                           seed=seed)


def fit_compat(old: np.ndarray, new: np.ndarray, labels: np.ndarray, rho: bool = True,
               tau: float | None = None, epochs: int | None = None, hidden: int | None = None,
               search_size: bool = False, progress: bool = True,
               recipe: TransformRecipe | None = None, method: str = "mcl"
               ) -> tuple[Transforms, dict]:
    """psi (and rho) on all items; tau (unless given) and, with `search_size`, the width and
    epochs too, chosen on a 10% hold-out by the CIFAR-100 recipe's grids. A closed-form
    `method` ("procrustes", "affine") is solved in one step: nothing to choose."""
    old, new = unit_rows("old", old), unit_rows("new", new)  # the transforms' sphere
    if method in CLOSED_FORMS:
        config = TransformConfig(objective=method, epochs=0, hidden=0, sources=("user",))
        return fit_transforms(config, old, new, labels, progress), \
            {"tau": None, "hidden": 0, "epochs": 0, "selection": None}
    recipe = recipe or profile("cpu").transforms  # default: the CIFAR-100 recipe's settings
    base = TransformConfig(objective="mcl", rho=rho, epochs=epochs or recipe.epochs,
                           hidden=hidden or recipe.hidden, sources=("user",))
    selection = None
    if tau is None or search_size:
        fit, val = holdout(labels)
        selection = select_settings(
            base, old, new, labels, fit, val, taus=recipe.tau_grid if tau is None else (tau,),
            tau_epochs=recipe.tau_epochs if tau is None else None,
            widths=recipe.hidden_grid if search_size else (),
            epochs=recipe.epochs_grid if search_size else (), progress=progress)
        base = replace(base, hidden=selection["hidden"], epochs=selection["epochs"])
        tau = selection["tau"]
    t = fit_transforms(replace(base, tau=tau), old, new, labels, progress)
    return t, {"tau": tau, "hidden": base.hidden, "epochs": base.epochs,
               "selection": selection}


def save_compat(path: Path | str, t: Transforms, old: np.ndarray, new: np.ndarray,
                info: dict, centres: dict[str, np.ndarray] | None = None) -> Path:
    """A weights_only-loadable file: the transforms, their config, the dimensions, the
    mean direction of each space (to recognise embeddings of another model pair), and the
    `centres` the training embeddings were moved by (empty: not centred). `old`, `new`: the
    training embeddings as given. Written atomically: a failed save leaves the previous
    file as it was."""
    state = t.state()
    old, new = unit_rows("old", old), unit_rows("new", new)
    state.update(format=FORMAT, old_dim=int(old.shape[1]), new_dim=int(new.shape[1]),
                 unit_inputs=True,
                 old_mean=torch.as_tensor(old.mean(0)), new_mean=torch.as_tensor(new.mean(0)),
                 centres={k: torch.as_tensor(np.asarray(v, dtype=np.float32))
                          for k, v in (centres or {}).items()},
                 tau=float(info["tau"] or 0.0),  # 0: a closed form has no temperature
                 val_auc_mAP={str(k): float(v) for k, v in
                              ((info["selection"] or {}).get("val_auc_mAP") or {}).items()})
    return save_torch(path, state)


# What `load_compat` checks before it trusts a file: each field and its type.
_COMPAT_FIELDS = {"config": str, "psi": dict, "psi_dims": list, "rho": dict,
                  "classifier": dict, "history": list, "old_dim": int, "new_dim": int,
                  "old_mean": torch.Tensor, "new_mean": torch.Tensor, "tau": float}


def _check_compat_state(state: dict) -> str | None:
    """What is wrong with a COMPAT state, or None."""
    for key, kind in _COMPAT_FIELDS.items():
        if key not in state:
            return f"it lacks the field {key!r}"
        if not isinstance(state[key], kind):
            return f"its field {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
    if state.get("unit_inputs") is not True:  # apply normalises; so must the fit have
        return ("it was fitted by an older rmlib, which did not L2-normalise the embeddings "
                "it fitted on, while apply now does")
    if state["format"] != "rmlib-compat-1" and "centres" not in state:
        return "it lacks the field 'centres'"
    centres = state.setdefault("centres", {})  # format 1: not centred
    if not isinstance(centres, dict) or set(centres) not in (set(), {"old", "new"}):
        return "its centres are neither empty nor one for the old and one for the new system"
    dims = state["psi_dims"]
    if len(dims) != 3 or not all(isinstance(d, int) and d >= 0 for d in dims) or \
            0 in dims[:2]:
        return (f"its psi_dims {dims} are not two positive integers and a width (0 for a "
                "closed form)")
    if (dims[0], dims[1]) != (state["new_dim"], state["old_dim"]):
        return (f"psi maps {dims[0]} -> {dims[1]} dimensions but the file is for new "
                f"{state['new_dim']} -> old {state['old_dim']}")
    vectors = [("old_mean", state["old_mean"], state["old_dim"]),
               ("new_mean", state["new_mean"], state["new_dim"])] + \
              [(f"{side} centre", centres[side], state[f"{side}_dim"]) for side in centres]
    for where, value, dim in vectors:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (dim,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"its {where} has shape {shape}, not ({dim},)"
    tensors = [("psi", v) for v in state["psi"].values()] + \
              [("rho", v) for v in state["rho"].values()] + \
              [(where, value) for where, value, _ in vectors]
    for where, value in tensors:
        if not isinstance(value, torch.Tensor):
            return f"its {where} weights hold a {type(value).__name__}, not tensors"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"its {where} weights hold NaN or inf"
    return _check_compat_modules(state)


# Tensors per hidden layer of an EmbeddingTransform's state (Linear: weight, bias;
# BatchNorm1d: weight, bias, running mean and var, batch count), and of its output Linear.
_ENTRIES_PER_LAYER, _OUTPUT_ENTRIES = 7, 2


def _check_compat_modules(state: dict) -> str | None:
    """The config agrees with the tensors in the file, checked before any module is
    built for real: the number of layers follows from the number of tensors, and every
    shape is compared with a build on the meta device (no memory). A crafted config (say
    a million layers) is refused without allocating anything."""
    try:
        raw = json.loads(state["config"])
        config = TransformConfig(**{**raw, "sources": tuple(raw["sources"])})
    except (ValueError, TypeError, KeyError, RmlibError) as exc:
        return f"its config does not parse ({type(exc).__name__})"
    if config.objective not in METHODS:
        return (f"its objective is {config.objective!r}; `fit` writes "
                f"{', '.join(map(repr, METHODS))} transforms")
    if type(config.seed) is not int or not 0 <= config.seed < 2 ** 63:
        return f"its config has seed {config.seed!r}, not a non-negative integer"
    if type(config.rho) is not bool:
        return f"its config has rho {config.rho!r}, not true or false"
    if not isinstance(config.layers, int) or config.layers < 1:
        return f"its config has layers {config.layers!r}, not a positive integer"
    closed = config.objective in CLOSED_FORMS
    if state["format"] == "rmlib-compat-1" and (closed or state["centres"]):
        return "it says format rmlib-compat-1, which held neither closed forms nor centres"
    if closed != (config.hidden == 0):
        return (f"its config's width {config.hidden!r} does not fit {config.objective!r} "
                "(a closed form has width 0, MCL a positive one)")
    if config.hidden != state["psi_dims"][2]:
        return f"its config's width {config.hidden!r} is not psi's {state['psi_dims'][2]}"
    # a closed form's map is one linear layer, whatever `layers` says
    entries = _ENTRIES_PER_LAYER * config.layers + _OUTPUT_ENTRIES \
        if config.objective == "mcl" else 1 + (config.objective == "affine")
    for name, wanted in (("psi", entries), ("rho", entries if config.rho else 0),
                         ("classifier", 0)):
        if len(state[name]) != wanted:
            says = f"{config.objective!r} psi is one linear map" if closed else \
                f"its config says {config.layers} layer(s){' with rho' * config.rho}"
            return (f"{says}, which is {wanted} {name} tensors, but the file holds "
                    f"{len(state[name])}")
    with torch.device("meta"), torch.random.fork_rng():
        meta = build_transforms(config, state["old_dim"], state["new_dim"])
    for name, module in (("psi", meta.psi), ("rho", meta.rho)):
        if module is None:
            continue
        for key, value in module.state_dict().items():
            found = state[name].get(key)
            if found is None or tuple(found.shape) != tuple(value.shape):
                shape = None if found is None else tuple(found.shape)
                return (f"its {name} tensor {key!r} has shape {shape}, but its config needs "
                        f"{tuple(value.shape)}")
    return None


def load_compat(path: Path | str) -> tuple[Transforms, dict]:
    """The transforms of a COMPAT.pt, after checking every field: one RmlibError that names
    the file and what is wrong with it."""
    path = readable_file(path, "a COMPAT.pt file made by `python -m rmlib fit`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RmlibError(f"{path} is not a file written by `python -m rmlib fit` "
                         f"({type(exc).__name__})") from exc
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise RmlibError(f"{path} is not a file written by `python -m rmlib fit`")
    problem = _check_compat_state(state)
    if problem is None:
        try:
            return Transforms.from_state(state), state
        except (KeyError, TypeError, ValueError, RuntimeError, RmlibError) as exc:
            problem = f"its transforms do not load ({type(exc).__name__}: " + \
                      str(exc).strip().splitlines()[0][:200] + ")"
    raise RmlibError(f"{path} is damaged: {problem}; fit it again with `python -m rmlib fit`")


def _mean_cosine(a: np.ndarray, mean: torch.Tensor) -> float:
    m = a.mean(0)
    return float(m @ mean.numpy() / (np.linalg.norm(m) * float(mean.norm()) + 1e-12))


def unit_systems(arrays: SystemPair) -> SystemPair:
    """`arrays` with the four embeddings L2-normalised, as the transforms expect. Negative
    flips stay counted against what the deployed old system served: the raw old query and
    gallery become the reference when they were not unit length."""
    if all(is_unit(a) for a in (arrays.old_query, arrays.old_gallery, arrays.new_query,
                                arrays.new_gallery)):
        return arrays
    ref_query, ref_gallery = arrays.reference_side()
    return replace(arrays, old_query=unit_rows("old_query", arrays.old_query),
                   old_gallery=unit_rows("old_gallery", arrays.old_gallery),
                   new_query=unit_rows("new_query", arrays.new_query),
                   new_gallery=unit_rows("new_gallery", arrays.new_gallery),
                   reference_query=ref_query, reference_gallery=ref_gallery)


def apply_compat(path: Path | str, arrays: SystemPair, force: bool = False
                 ) -> SystemPair:
    """The RM systems of an evaluation file, after checking that it fits the transforms.
    Every embedding is L2-normalised first (`unit_systems`), and moved by the recorded
    centres when `fit` centred, as `fit` did."""
    t, state = load_compat(path)
    arrays = unit_systems(arrays)
    for name, a, dim in (("old_gallery", arrays.old_gallery, state["old_dim"]),
                         ("new_query", arrays.new_query, state["new_dim"]),
                         ("new_gallery", arrays.new_gallery, state["new_dim"])):
        if a.shape[1] != dim:
            raise RmlibError(f"{name} has dimension {a.shape[1]} but {path} was fitted for "
                             f"{dim}; use the file fitted for this model pair")
    if not force:
        for name, a, key in (("old_gallery", arrays.old_gallery, "old_mean"),
                             ("new_gallery", arrays.new_gallery, "new_mean")):
            cos = _mean_cosine(a, state[key])
            if cos < MIN_MEAN_COSINE:
                raise RmlibError(
                    f"{name} does not look like the embeddings {path} was fitted on (mean "
                    f"direction cosine {cos:.2f} < {MIN_MEAN_COSINE}); use the file fitted "
                    "for this model pair, or pass --force")
    if state["centres"]:
        arrays = centred(arrays, state["centres"]["old"].numpy(),
                         state["centres"]["new"].numpy())
    try:
        return rm_systems(t, arrays)
    except RmlibError as exc:  # finite weights can still overflow on far-out embeddings
        raise RmlibError(f"applying {path} to these embeddings fails: {exc}") from exc


def fit_command(train: Path, out: Path, rho: bool, tau: float | None, epochs: int | None,
                search_size: bool = False, progress: bool = True, centre: bool = False,
                method: str = "mcl") -> dict:
    """`python -m rmlib fit`: read TRAIN.npz, fit, write COMPAT.pt; what it did."""
    start = time.time()
    closed = method in CLOSED_FORMS
    old, new, labels = load_training_file(
        train, selects=not closed and (tau is None or search_size), contrasts=not closed)
    unit = is_unit(old) and is_unit(new)
    fitted_on = unit_rows("old", old), unit_rows("new", new)
    centres = {side: a.mean(0, dtype=np.float64) for side, a in
               zip(("old", "new"), fitted_on, strict=True)} if centre else None
    if centres:  # each system moved by the mean of its unit-length training embeddings
        for side, a in zip(("old", "new"), fitted_on, strict=True):
            # unit rows: one within 1e-4 of the mean keeps no direction worth the name
            at_mean = np.flatnonzero(np.linalg.norm(a - centres[side], axis=1) < 1e-4)
            if len(at_mean):
                raise RmlibError(f"centring leaves {len(at_mean)} {side} training row(s) at "
                                 f"the mean (e.g. row {at_mean[0]}), with no direction: drop "
                                 "them, or fit without --centre")
        moved = centred(SystemPair(*fitted_on[:1] * 2, *fitted_on[1:] * 2, labels),
                        centres["old"], centres["new"])
        fitted_on = (moved.old_gallery, moved.new_gallery)
    t, info = fit_compat(*fitted_on, labels, rho=rho, tau=tau, epochs=epochs,
                         search_size=search_size, progress=progress, method=method)
    save_compat(out, t, old, new, info, centres)
    return {**info, "seconds": time.time() - start, "items": len(labels), "normalised": not unit,
            "centred": bool(centres)}
