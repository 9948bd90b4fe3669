"""Benchmark: the merged online-backfill index against one faiss index of the same size.

    python benchmarks/bench_serving.py [--n 1000000] [--dim 128] [--queries 1000] [--k 10]

Synthetic gallery (N x d, L2-normalised), queries per second of the merged search at
backfill ratios 0, 0.5 and 1 against a single index of N items, exact (flat) and
approximate (IVF, recall against exact reported); memory of the parts; the cost of a
backfill batch of 10,000 items.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rmlib.serving import OnlineBackfillIndex  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.n, args.dim
    old, new = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d)))
    q_old = unit(rng.normal(size=(args.queries, d)))
    q_new = unit(rng.normal(size=(args.queries, d)))
    out = {"n": n, "dim": d, "queries": args.queries, "k": args.k,
           "threads": faiss.omp_get_max_threads(), "exact": {}, "approximate": {}}

    single = faiss.IndexFlatL2(d)
    single.add(old)
    t_single = best_of(lambda: single.search(q_old, args.k), args.repeats)
    out["exact"]["single_index_qps"] = round(args.queries / t_single)
    for approximate in (False, True):
        key = "approximate" if approximate else "exact"
        if approximate:
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, args.nlist)
            ivf.train(old[:100_000])
            ivf.add(old)
            ivf.nprobe = args.nprobe
            t_single_ivf = best_of(lambda ix=ivf: ix.search(q_old, args.k), args.repeats)
            out[key]["single_index_qps"] = round(args.queries / t_single_ivf)
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
                ids = order[done:done + 10_000]
                t0 = time.perf_counter()
                index.backfill(ids, new[ids])
                batch_times.append(time.perf_counter() - t0)
                done += len(ids)
            t_merged = best_of(lambda ix=index: ix.search(q_new, q_old, args.k), args.repeats)
            entry = {"merged_qps": round(args.queries / t_merged),
                     "merged_over_single": round(t_merged / base, 3)}
            if batch_times:
                entry["backfill_batch_10k_s"] = round(float(np.median(batch_times)), 3)
            if approximate:
                exact_ids = _exact_merged(old, new, order[:target], q_old, q_new, args.k)
                got = index.search(q_new, q_old, args.k).ids
                overlap = [len(set(a) & set(b)) / args.k
                           for a, b in zip(got, exact_ids, strict=True)]
                entry["recall_at_k_vs_exact"] = round(float(np.mean(overlap)), 4)
            out[key][f"t={t}"] = entry
    out["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["gallery_bytes_per_part_gb"] = round(n * d * 4 / 2**30, 2)
    print(json.dumps(out, indent=2))


def _exact_merged(old, new, backfilled, q_old, q_new, k):
    exact = OnlineBackfillIndex(old, new_dim=new.shape[1])
    for start in range(0, len(backfilled), 100_000):
        ids = backfilled[start:start + 100_000]
        exact.backfill(ids, new[ids])
    return exact.search(q_new, q_old, k).ids


if __name__ == "__main__":
    main()
