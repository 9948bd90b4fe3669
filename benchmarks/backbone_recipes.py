"""Benchmark: which cpu-profile backbone recipe buys the most retrieval quality per minute.

    RMLIB_DATA=../shared/data python -m benchmarks.backbone_recipes [--role old] [--out F]

Each recipe trains the `role` backbone on the training images of its classes minus a
stratified validation split (50 per class, seed 0) and is scored by leave-one-out mAP and
top-1 on that split, with the wall time of its training. The test set is never looked at:
the cpu profile's recipe is chosen from this file. Runs are cached like any other run
(role `<role>-recipe`), so a rerun only evaluates.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.common import Benchmark, parser
from rmlib.data import train_val_split
from rmlib.engine.backbones import count_parameters, train_backbone
from rmlib.engine.embed import extract_embeddings
from rmlib.evaluation.retrieval import Protocol, evaluate
from rmlib.methods.setups import cifar_setup

# Comparable compute (about 4.5 minutes for the old role on 2 cores), different trade-offs.
# Each recipe states every setting it changes, so that it does not follow the profile.
RECIPES = {
    "previous: 32-64-128, 6 epochs at 32 px": {
        "widths": (32, 64, 128), "epochs": 6, "low_res_epochs": 0},
    "wider 48-96-192, 5 epochs at 24 px + 1 at 32 px": {
        "widths": (48, 96, 192), "epochs": 6, "low_res_epochs": 5},
    "32-64-128, 8 epochs at 24 px + 2 at 32 px": {
        "widths": (32, 64, 128), "epochs": 10, "low_res_epochs": 8},
}
# The cpu profile took the last (best validation mAP at the same cost), with one more
# low-resolution epoch for the new model, as the 20-minute budget allows.


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--role", default="old", choices=("old", "new"))
    p.add_argument("--profile", default="cpu")
    args = p.parse_args()
    bench = Benchmark("backbone_recipes", args.out, args.profile)
    setup = cifar_setup(bench.config)
    data = setup.training_set(args.role)
    val_per_class = bench.config.profile.transforms.val_per_class
    fit, val = train_val_split(data.labels, val_per_class, seed=0)
    base = replace(setup.backbone_config(args.role), role=f"{args.role}-recipe")
    rows = []
    for name, overrides in RECIPES.items():
        cfg = replace(base, **overrides)
        trained = train_backbone(cfg, data.subset(fit), setup.objective(),
                                 runs=bench.config.paths.runs, progress=False)
        emb = extract_embeddings(trained, data.images[val])
        metrics = evaluate(emb, emb, Protocol.leave_one_out(data.labels[val])).summary()
        rows.append({"recipe": name, "overrides": overrides, **metrics,
                     "train_wall_time_s": trained.wall_time_s,
                     "parameters": count_parameters(trained.model), "run": trained.run_dir.name})
        print(f"{name:52s} val mAP {100 * metrics['mAP']:5.2f} top-1 {100 * metrics['top1']:5.2f}"
              f"  train {trained.wall_time_s / 60:4.1f} min", flush=True)
    bench.write({"rows": rows}, {"role": args.role, "fit_images": len(fit),
                                 "val_images": len(val), "val_per_class": val_per_class,
                                 "embedding_flip_tta": True})


if __name__ == "__main__":
    main()
