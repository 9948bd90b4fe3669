"""Benchmark: which shape of psi/rho buys the most backfill quality per second of fitting.

    RMLIB_DATA=DATA_ROOT python -m benchmarks.transform_recipes [--out F]

Each recipe fits MCL with rho (eq. 12-13) on the cached cpu-profile old/new embeddings of
the training images minus the validation split (`Experiment.validation_split`: 50 per
class, seed 0), at the tau and epochs the previous search chose (0.1, 12), and is scored
by the backfill AUC_mAP of the RM systems on that split (`rmlib.methods.selection`),
with the wall time of its fit. The test set is never looked at: the shape of psi/rho
(`TransformConfig.layers`, 2) and the cpu profile's width grid are chosen from this file;
the width and epochs within that grid are then searched by `select_settings`.
"""

from __future__ import annotations

import time

from benchmarks.common import Benchmark, parser
from rmlib.engine.transforms import fit_transforms
from rmlib.methods.experiment import Experiment
from rmlib.methods.selection import validation_auc

TAU, EPOCHS = 0.1, 12  # the previous search's choice (data/results/cifar100/cpu, 2 layers)
RECIPES = {
    "2 hidden layers x 1024 (the previous choice)": {"layers": 2, "hidden": 1024},
    "2 hidden layers x 512": {"layers": 2, "hidden": 512},
    "1 hidden layer x 1024": {"layers": 1, "hidden": 1024},
    "1 hidden layer x 2048": {"layers": 1, "hidden": 2048},
}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--profile", default="cpu")
    args = p.parse_args()
    bench = Benchmark("transform_recipes", args.out, args.profile)
    exp = Experiment("cifar100", bench.config, progress=False)
    fit, val = exp.validation_split()
    old, new = exp.embeddings("old", "train"), exp.embeddings("new", "train")
    labels = exp.setup.train.labels
    rows = []
    for name, shape in RECIPES.items():
        cfg = exp.transform_config("mcl", rho=True, tau=TAU, epochs=EPOCHS, **shape)
        t0 = time.time()
        fitted = fit_transforms(cfg, old[fit], new[fit], labels[fit], progress=False)
        seconds = time.time() - t0
        auc = validation_auc(cfg, old, new, labels, fit, val,
                             lambda *a, _fitted=fitted, **kw: _fitted, progress=False)
        params = sum(p.numel() for m in (fitted.psi, fitted.rho) for p in m.parameters())
        rows.append({"recipe": name, **shape, "tau": TAU, "epochs": EPOCHS,
                     "val_auc_mAP": auc, "fit_seconds": seconds, "parameters": params})
        print(f"{name:48s} val AUC_mAP {100 * auc:5.2f}  fit {seconds:6.1f} s  "
              f"({params:,} parameters)", flush=True)
    bench.write({"rows": rows}, {"objective": "mcl", "rho": True, "fit_items": len(fit),
                                 "val_items": len(val), "backbones": [
                                     exp.model(r).run_dir.name for r in ("old", "new")]})


if __name__ == "__main__":
    main()
