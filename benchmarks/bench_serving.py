"""Benchmark: the merged online-backfill index against one faiss index of the same size.

    python -m benchmarks.bench_serving [--n 1000000] [--dim 128] [--queries 1000] [--k 10]
    RMLIB_DATA=DATA_ROOT python -m benchmarks.bench_serving --cifar100 cpu \
        --nlist 100 --nprobe 8

Queries per second of the merged search at backfill ratios 0, 0.5 and 1 against a single
index of N items, exact (flat) and approximate (IVF, its recall@k against exact merged
search reported); memory of the parts; the cost of a backfill batch (10,000 items, or a
tenth of a smaller gallery). The gallery is synthetic (N x d, L2-normalised; the worst
case for IVF, which relies on clusters), or the CIFAR-100 test set with the RM systems of
a profile's experiment (real embeddings: psi(rho(q)) on the old part, rho on the new).
Writes data/results/benchmarks/serving_<synthetic|cifar100-PROFILE>.json.
"""

from __future__ import annotations

import json
import resource
import time

import faiss
import numpy as np

from benchmarks.common import Benchmark, parser
from rmlib.config import Config
from rmlib.serving.index import OnlineBackfillIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cifar100_systems(config: Config, queries: int):
    """The RM systems of the CIFAR-100 experiment: (old gallery, new gallery, old-space
    queries psi(rho(q)), new-space queries rho(q)); the first `queries` test images query."""
    from rmlib.methods.experiment import Experiment
    from rmlib.methods.registry import METHODS

    rm = METHODS["RM"].systems(Experiment("cifar100", config, progress=False), 0)
    return (rm.old_gallery, rm.new_gallery, rm.old_query[:queries], rm.new_query[:queries])


def synthetic_systems(n: int, d: int, queries: int):
    rng = np.random.default_rng(0)
    return (unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d))),
            unit(rng.normal(size=(queries, d))), unit(rng.normal(size=(queries, d))))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--cifar100", metavar="PROFILE",
                   help="use the CIFAR-100 test set and that profile's RM systems instead")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    args = p.parse_args()
    name = f"cifar100-{args.cifar100}" if args.cifar100 else "synthetic"
    bench = Benchmark(f"serving_{name}", args.out, args.cifar100)
    if args.cifar100:
        old, new, q_old, q_new = cifar100_systems(bench.config, args.queries)
    else:
        old, new, q_old, q_new = synthetic_systems(args.n, args.dim, args.queries)
    n, d = new.shape
    batch = min(10_000, max(1, n // 10))
    out = {"gallery": name, "n": n, "dim": d, "queries": len(q_new), "k": args.k,
           "nlist": args.nlist, "nprobe": args.nprobe, "backfill_batch": batch,
           "threads": faiss.omp_get_max_threads(), "exact": {}, "approximate": {}}

    exact_ids = {}  # the exact merged top-k at each t: the reference for IVF's recall
    single = faiss.IndexFlatL2(d)
    single.add(new)
    t_single = best_of(lambda: single.search(q_new, args.k), args.repeats)
    out["exact"]["single_index_qps"] = round(len(q_new) / t_single)
    for approximate in (False, True):
        key = "approximate" if approximate else "exact"
        if approximate:
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, args.nlist)
            ivf.train(new[:100_000])
            ivf.add(new)
            ivf.nprobe = args.nprobe
            t_single_ivf = best_of(lambda ix=ivf: ix.search(q_new, args.k), args.repeats)
            out[key]["single_index_qps"] = round(len(q_new) / t_single_ivf)
            base = t_single_ivf
        else:
            base = t_single
        index = OnlineBackfillIndex(old, new_dim=d, approximate=approximate, nlist=args.nlist,
                                    nprobe=args.nprobe, new_training_sample=new[:100_000])
        order = np.random.default_rng(1).permutation(n)
        done = 0
        for t in (0.0, 0.5, 1.0):
            target = int(t * n)
            batch_times = []
            while done < target:
                ids = order[done:min(done + batch, target)]
                t0 = time.perf_counter()
                index.backfill(ids, new[ids])
                batch_times.append(time.perf_counter() - t0)
                done += len(ids)
            t_merged = best_of(lambda ix=index: ix.search(q_new, q_old, args.k), args.repeats)
            entry = {"merged_qps": round(len(q_new) / t_merged),
                     "merged_over_single": round(t_merged / base, 3)}
            if batch_times:
                entry["backfill_batch_s"] = round(float(np.median(batch_times)), 4)
            got = index.search(q_new, q_old, args.k).ids
            if not approximate:  # same order, same states: the exact pass runs first
                exact_ids[t] = got
            else:
                overlap = [len(set(a) & set(b)) / args.k
                           for a, b in zip(got, exact_ids[t], strict=True)]
                entry["recall_at_k_vs_exact"] = round(float(np.mean(overlap)), 4)
            out[key][f"t={t}"] = entry
    out["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["gallery_bytes_per_part_gb"] = round(n * d * 4 / 2**30, 3)
    print(json.dumps(out, indent=2, default=str))
    bench.write(out, vars(args) | {"out": None})


if __name__ == "__main__":
    main()
