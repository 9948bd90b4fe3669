"""Benchmark: the whole 21-point backfill curve on N x N at d = 128 (leave-one-out), against
the per-query reference loop of tests/reference.py, with the process's peak memory.

The reference loop is timed on a subset of queries and extrapolated linearly (it is
per-query by construction); its results on that subset are checked against rmlib's.

    python -m benchmarks.bench_backfill                  # CIFAR-100's test set size:
                                                         # 10,000 items of 100 classes
    python -m benchmarks.bench_backfill --n 50000 --classes 1000 --repeats 1 --ref-queries 5
                                                         # ImageNet's validation size
Writes data/results/benchmarks/backfill_curve_<N>.json.
"""

from __future__ import annotations

import json
import platform
import resource
import time

import numpy as np
import torch

from benchmarks.common import Benchmark, parser
from rmlib.evaluation.backfill import simulate_backfill
from rmlib.evaluation.retrieval import Protocol, chunk_size
from tests.reference import reference_curve


def synthetic(n: int, dim: int, classes: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    def system(noise):
        centres = rng.normal(size=(classes, dim))
        x = centres[labels] + noise * rng.normal(size=(n, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return labels, system(2.0), system(1.5)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--ref-queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    bench = Benchmark(f"backfill_curve_{args.n}", args.out)
    labels, old, new = synthetic(args.n, args.dim, args.classes)
    protocol = Protocol.leave_one_out(labels)
    simulate_backfill(old[:500], old[:500], new[:500], new[:500],
                      Protocol.leave_one_out(labels[:500]))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        curve = simulate_backfill(old, old, new, new, protocol)
        times.append(time.perf_counter() - t0)
    fast = min(times)

    # Reference: the same curve restricted to the first q queries (the gallery stays all n).
    q = args.ref_queries
    t0 = time.perf_counter()
    ref = reference_curve(old[:q], old, new[:q], new, labels[:q], labels, self_excluded=True)
    ref_time = (time.perf_counter() - t0) * args.n / q
    mine = simulate_backfill(old[:q], old, new[:q], new,
                             Protocol(labels[:q], labels, self_excluded=True))
    diff = max(abs(a - b) for k in ("mAP", "top1", "top5", "nfr")
               for a, b in zip(ref[k], getattr(mine, k), strict=True))
    out = {
        "n": args.n, "dim": args.dim, "classes": args.classes, "points": len(curve.t),
        "rmlib_seconds": round(fast, 2), "rmlib_all_runs": [round(t, 2) for t in times],
        "reference_seconds_extrapolated": round(ref_time, 1),
        "reference_queries_timed": q, "speedup": round(ref_time / fast, 1),
        "max_abs_difference_on_subset": diff,
        "auc_mAP": round(curve.auc("mAP"), 4), "threads": torch.get_num_threads(),
        "query_chunk": chunk_size(args.n), "max_rss_gb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(out, indent=2))
    bench.write(out, {"n": args.n, "dim": args.dim, "classes": args.classes,
                      "ref_queries": args.ref_queries,
                      "repeats": args.repeats})


if __name__ == "__main__":
    main()
