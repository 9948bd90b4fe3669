"""Benchmark: the merged online-backfill index against one faiss index of the same size.

    python -m benchmarks.bench_serving [--n 1000000] [--dim 128] [--queries 1000] [--k 10]
    RMLIB_DATA=DATA_ROOT python -m benchmarks.bench_serving --cifar100 cpu \
        --nlist 100 --nprobe 8
    python -m benchmarks.bench_serving --backend milvus [--n 1000000]

Queries per second of the merged search at backfill ratios 0, 0.5 and 1 against a single
index of N items, exact (flat) and approximate (IVF, its recall@k against exact merged
search reported); memory of the parts; the cost of a backfill batch (10,000 items, or a
tenth of a smaller gallery). The gallery is synthetic (N x d, L2-normalised; the worst
case for IVF, which relies on clusters), or the CIFAR-100 test set with the RM systems of
a profile's experiment (real embeddings: psi(rho(q)) on the old part, rho on the new).
Writes data/results/benchmarks/serving_<synthetic|cifar100-PROFILE>.json.

With `--backend milvus` the parts are two collections of a Milvus Lite file (under the
runs folder, removed afterwards), searched exactly (FLAT), against one collection of N
new embeddings (both flushed at each t, and timed alternately); it reports the merged
and single search times, queries per second, how fast the old part loads and how fast a
backfill batch moves items, and writes serving_<gallery>_milvus.json.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from importlib.metadata import version

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


def backfill_until(index: OnlineBackfillIndex, order: np.ndarray, new: np.ndarray,
                   target: int, batch: int) -> list[float]:
    """Backfill `order` in batches until `target` items are new; the seconds of each batch."""
    times = []
    while index.num_new < target:
        ids = order[index.num_new:min(index.num_new + batch, target)]
        times.append(best_of(lambda ids=ids: index.backfill(ids, new[ids]), 1))
    return times


def milvus_exact(bench: Benchmark, old, new, q_old, q_new, k: int, repeats: int, batch: int
                 ) -> dict:
    """Exact merged search in Milvus at t = 0, 0.5, 1 against one collection of N items.

    Milvus Lite seals, indexes and compacts segments in the background, on the same cores,
    so at each t both collections are flushed first and the single and the merged search
    are timed alternately (best of `repeats` each): the background work lands on both.
    """
    from rmlib.serving.parts import MilvusParts

    n, d = new.shape
    folder = bench.config.paths.runs / "bench_serving_milvus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    uri = str(folder / "bench.db")
    try:
        t0 = time.perf_counter()
        single = MilvusParts(uri, "single")
        single.create({"old": d, "new": d}, approximate=False, nlist=0)
        single.put("new", np.arange(n), new, replace=False)
        out = {"single_load_items_per_s": round(n / (time.perf_counter() - t0))}
        single.flush()
        single_ids = single.search("new", q_new, k)[1]
        t0 = time.perf_counter()
        index = OnlineBackfillIndex(old, new_dim=d, backend="milvus", uri=uri, name="live")
        out["old_part_load_items_per_s"] = round(n / (time.perf_counter() - t0))
        order = np.random.default_rng(1).permutation(n)
        for t in (0.0, 0.5, 1.0):
            batch_times = backfill_until(index, order, new, int(t * n), batch)
            index.flush()
            t_single, t_merged = np.inf, np.inf
            for _ in range(repeats):  # alternately, so that background work hits both
                t_single = min(t_single, best_of(lambda: single.search("new", q_new, k), 1))
                t_merged = min(t_merged, best_of(lambda: index.search(q_new, q_old, k), 1))
            entry = {"single_collection_qps": round(len(q_new) / t_single),
                     "merged_qps": round(len(q_new) / t_merged),
                     "merged_over_single": round(t_merged / t_single, 3)}
            if batch_times:
                entry["backfill_batch_s"] = round(float(np.median(batch_times)), 3)
                entry["backfill_items_per_s"] = round(batch / float(np.median(batch_times)))
            if t == 1.0:  # everything new: the merged answer is the single collection's
                entry["same_ids_as_single"] = bool(
                    np.array_equal(index.search(q_new, q_old, k).ids, single_ids))
            out[f"t={t}"] = entry
        index.close()
        single.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


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
    p.add_argument("--backend", choices=("faiss", "milvus"), default="faiss")
    args = p.parse_args()
    name = f"cifar100-{args.cifar100}" if args.cifar100 else "synthetic"
    suffix = "_milvus" if args.backend == "milvus" else ""
    bench = Benchmark(f"serving_{name}{suffix}", args.out, args.cifar100)
    if args.cifar100:
        old, new, q_old, q_new = cifar100_systems(bench.config, args.queries)
    else:
        old, new, q_old, q_new = synthetic_systems(args.n, args.dim, args.queries)
    n, d = new.shape
    batch = min(10_000, max(1, n // 10))
    if args.backend == "milvus":
        out = {"gallery": name, "backend": "milvus-lite " + version("milvus-lite"), "n": n,
               "dim": d, "queries": len(q_new), "k": args.k, "backfill_batch": batch,
               "exact": milvus_exact(bench, old, new, q_old, q_new, args.k, args.repeats,
                                     batch)}
        out["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(json.dumps(out, indent=2, default=str))
        bench.write(out, vars(args) | {"out": None})
        return
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
        for t in (0.0, 0.5, 1.0):
            batch_times = backfill_until(index, order, new, int(t * n), batch)
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
