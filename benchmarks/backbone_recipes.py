"""Benchmark: which cpu-profile backbone recipe buys the most retrieval quality per minute.

    RMLIB_DATA=DATA_ROOT python -m benchmarks.backbone_recipes [--role old] [--out F] \
        [--only NAME ...]

Each recipe trains the `role` backbone on the training images of its classes minus a
stratified validation split (50 per class, seed 0) and is scored by leave-one-out mAP and
top-1 on that split, with the wall time of its training, under two test-time views:
flip (an image and its mirror) and flip+shift (also both shifted by one pixel). The test
set is never looked at: the cpu profile's recipe is chosen from this file. Runs are
cached like any other run (role `<role>-recipe`), so a rerun only evaluates.

The rows: the previous cpu recipe; each fast-training option of `rmlib.engine.fast_training`
added to it on its own (airbench's ablations, Jordan 2024); all of them together; the ones
that helped on their own, together; and those on wider nets and more epochs, which the
2-core budget (old and new backbones within 20 minutes) can pay for.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.common import Benchmark, parser
from rmlib import RmlibError
from rmlib.data import train_val_split
from rmlib.engine.backbones import count_parameters, train_backbone
from rmlib.engine.embed import extract_embeddings
from rmlib.evaluation.retrieval import Protocol, evaluate
from rmlib.methods.setups import cifar_setup

# The last cpu recipe, every setting stated (the profile's own recipe has moved on since).
PREVIOUS = {"widths": (32, 64, 128), "epochs": 10, "low_res_epochs": 8, "whiten": False,
            "dirac": False, "bn_bias_lr": 1.0, "ema": 0.0, "bn_momentum": 0.1,
            "flip": "random", "label_smoothing": 0.1}
OPTIONS = {"whiten": True, "dirac": True, "bn_bias_lr": 64.0, "ema": 0.99, "bn_momentum": 0.4,
           "flip": "alternating", "label_smoothing": 0.2}
# The options that helped on their own (one seed each). Together they beat all options
# together: dirac, the weight average and alternating flips cost here, alone and combined.
HELPFUL = {"whiten": True, "bn_bias_lr": 8.0, "label_smoothing": 0.2}
# Each recipe states every setting it changes, so that it does not follow the profile.
RECIPES = {
    "previous: 32-64-128, 8 epochs at 24 px + 2 at 32 px": PREVIOUS,
    "+ whitening stem": {**PREVIOUS, "whiten": True},
    "+ dirac init": {**PREVIOUS, "dirac": True},
    "+ BN-bias lr x64": {**PREVIOUS, "bn_bias_lr": 64.0},
    "+ BN-bias lr x8": {**PREVIOUS, "bn_bias_lr": 8.0},
    "+ EMA 0.99, BN momentum 0.4": {**PREVIOUS, "ema": 0.99, "bn_momentum": 0.4},
    "+ alternating flip": {**PREVIOUS, "flip": "alternating"},
    "+ label smoothing 0.2": {**PREVIOUS, "label_smoothing": 0.2},
    "all options": {**PREVIOUS, **OPTIONS},
    "all options, 48-96-192": {**PREVIOUS, **OPTIONS, "widths": (48, 96, 192)},
    "all options, 64-128-256": {**PREVIOUS, **OPTIONS, "widths": (64, 128, 256)},
    "helpful alone: whitening, BN-bias lr x8, label smoothing 0.2": {**PREVIOUS, **HELPFUL},
    "helpful, 64-128-256": {**PREVIOUS, **HELPFUL, "widths": (64, 128, 256)},
    "helpful, 64-128-256, 11 epochs at 24 px + 3 at 32 px": {
        **PREVIOUS, **HELPFUL, "widths": (64, 128, 256), "epochs": 14, "low_res_epochs": 11},
}
VIEWS = ("flip", "flip+shift")


def score(trained, images, labels) -> dict:
    """Validation mAP and top-1 of a trained backbone under each test-time view."""
    protocol = Protocol.leave_one_out(labels)
    out = {}
    for views in VIEWS:
        emb = extract_embeddings(trained, images, views=views)
        out[views] = evaluate(emb, emb, protocol).summary()
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--role", default="old", choices=("old", "new"))
    p.add_argument("--profile", default="cpu")
    p.add_argument("--only", nargs="+", choices=list(RECIPES), help="run these recipes only")
    args = p.parse_args()
    bench = Benchmark("backbone_recipes", args.out, args.profile)
    setup = cifar_setup(bench.config)
    data = setup.training_set(args.role)
    val_per_class = bench.config.profile.transforms.val_per_class
    fit, val = train_val_split(data.labels, val_per_class, seed=0)
    base = replace(setup.backbone_config(args.role), role=f"{args.role}-recipe")
    rows = []
    for name in args.only or RECIPES:
        overrides = RECIPES[name]
        try:
            trained = train_backbone(replace(base, **overrides), data.subset(fit),
                                     setup.objective(), runs=bench.config.paths.runs,
                                     precision=bench.config.precision, progress=False)
        except RmlibError as exc:  # a recipe may diverge: that is a result too
            rows.append({"recipe": name, "overrides": overrides, "diverged": str(exc)})
            print(f"{name:52s} diverged: {exc}", flush=True)
            continue
        scores = score(trained, data.images[val], data.labels[val])
        minutes = trained.wall_time_s / 60
        rows.append({"recipe": name, "overrides": overrides, **scores["flip"],
                     "by_views": scores, "train_wall_time_s": trained.wall_time_s,
                     "mAP_per_minute": scores["flip"]["mAP"] / minutes,
                     "final_train_acc": trained.history[-1]["train_acc"],
                     "parameters": count_parameters(trained.model), "run": trained.run_dir.name})
        print(f"{name:52s} val mAP {100 * scores['flip']['mAP']:5.2f} "
              f"(+shift {100 * scores['flip+shift']['mAP']:5.2f})  top-1 "
              f"{100 * scores['flip']['top1']:5.2f}  train {minutes:4.1f} min", flush=True)
    bench.write({"rows": rows}, {"role": args.role, "fit_images": len(fit),
                                 "val_images": len(val), "val_per_class": val_per_class,
                                 "views": list(VIEWS)})


if __name__ == "__main__":
    main()
