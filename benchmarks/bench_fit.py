"""Benchmark: `python -m rmlib fit` on 50,000 x 128 embeddings (psi and rho together).

    python -m benchmarks.bench_fit [--train TRAIN.npz] [--n 50000] [--dim 128] [--out F]

Without --train, synthetic labelled embeddings of 100 classes. Times fit with a given tau
(one training run) and with tau chosen on validation (the default of the command).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Benchmark, parser
from rmlib.own_upgrade import fit_compat, load_training_file


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--train", type=Path)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args()
    bench = Benchmark("fit", args.out)
    if args.train:
        old, new, labels = load_training_file(args.train)
    else:
        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(100), args.n // 100)
        unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
        shape = (len(labels), args.dim)
        old = unit(rng.normal(size=(100, args.dim))[labels] + 1.5 * rng.normal(size=shape))
        new = unit(rng.normal(size=(100, args.dim))[labels] + 1.0 * rng.normal(size=shape))
    out = {"items": len(labels), "old_dim": old.shape[1], "new_dim": new.shape[1]}
    t0 = time.perf_counter()
    fit_compat(old, new, labels, rho=True, tau=0.1, progress=False)
    out["fit_given_tau_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    _, info = fit_compat(old, new, labels, rho=True, tau=None, progress=False)
    out["fit_with_tau_selection_s"] = round(time.perf_counter() - t0, 1)
    out["chosen_tau"] = info["tau"]
    print(json.dumps(out, indent=2))
    bench.write(out, {"train": str(args.train) if args.train else "synthetic, 100 classes",
                      "n": out["items"], "dim": args.dim})


if __name__ == "__main__":
    main()
