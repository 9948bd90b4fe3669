"""Benchmark: fitting psi in closed form (Procrustes, affine) on 50,000 x 128 training pairs.

    python -m benchmarks.bench_closed_form [--train TRAIN.npz] [--n 50000] [--dim 128]
                                           [--repeats 5] [--out F]

Without --train, synthetic unit-length pairs (the old embedding a noisy rotation of the
new one). Times `fit_compat(..., method=...)`, the whole of `python -m rmlib fit --method`
after the file is read: normalising, solving, building the module. Reports the median and
the slowest of `--repeats` fits; the target is under 10 s each.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Benchmark, parser
from rmlib.own_upgrade import CLOSED_FORMS, fit_compat, load_training_file


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--train", type=Path)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    bench = Benchmark("closed_form", args.out)
    if args.train:
        old, new, labels = load_training_file(args.train, selects=False, contrasts=False)
    else:
        rng = np.random.default_rng(0)
        new = rng.normal(size=(args.n, args.dim))
        rotation = np.linalg.qr(rng.normal(size=(args.dim, args.dim)))[0]
        old = (new @ rotation.T + 0.5 * rng.normal(size=new.shape)).astype(np.float32)
        new, labels = new.astype(np.float32), np.zeros(args.n, np.int64)
    out = {"items": len(labels), "old_dim": old.shape[1], "new_dim": new.shape[1]}
    for method in CLOSED_FORMS:
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fit_compat(old, new, labels, rho=False, progress=False, method=method)
            seconds.append(time.perf_counter() - t0)
        out[method] = {"median_s": round(statistics.median(seconds), 3),
                       "max_s": round(max(seconds), 3)}
    print(json.dumps(out, indent=2))
    bench.write(out, {"train": str(args.train) if args.train else "synthetic rotation",
                      "n": out["items"], "dim": args.dim, "repeats": args.repeats})


if __name__ == "__main__":
    main()
