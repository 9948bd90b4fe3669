"""Benchmark: the cost of one psi/rho training step, and of the MCL loss with its mining.

    python -m benchmarks.bench_transform_step [--out F]

Per objective and width: milliseconds per step of `fit_transforms` (P x K = 32 x 8 = 256
items, synthetic unit embeddings of 100 classes x 100 items), from the difference of a
3-epoch and a 1-epoch fit, so that start-up costs cancel. Then MCL forward + backward on
one 256-item batch with the mining of `rmlib.losses` (a partial sort of each row) and
with a full sort of each row instead (the previous mining; both mine each system once).
"""

from __future__ import annotations

import time
from unittest import mock

import numpy as np
import torch

from benchmarks.common import Benchmark, parser
from rmlib import losses
from rmlib.engine.transforms import TransformConfig, fit_transforms, steps_per_epoch

NAMES = ("rqt", "cl", "mcl", "mcl-rho", "fct", "bict")


def step_ms(name: str, hidden: int, old, new, labels) -> float:
    seconds = []
    for epochs in (1, 3):
        cfg = TransformConfig(objective=name.split("-")[0], rho=name.endswith("-rho"),
                              hidden=hidden, epochs=epochs, tau=0.1, num_classes=100)
        t0 = time.perf_counter()
        fit_transforms(cfg, old, new, labels, progress=False)
        seconds.append(time.perf_counter() - t0)
    per_epoch = (seconds[1] - seconds[0]) / 2
    return 1000 * per_epoch / steps_per_epoch(cfg, labels)


def hardest_half_by_sort(dist, mask, hardest):
    """The previous mining: one full sort of every row."""
    far = hardest == "far"
    keep = (mask.sum(1, keepdim=True) + 1) // 2
    score = dist.masked_fill(~mask, float("-inf") if far else float("inf"))
    ordered = torch.sort(score, dim=1, descending=far).values
    cut = ordered.gather(1, (keep - 1).clamp_min(0))
    chosen = dist >= cut if far else dist <= cut
    return mask & chosen & (keep > 0)


def loss_ms(repeats: int = 100) -> dict:
    g = torch.Generator().manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=1)  # noqa: E731
    old, rev, new = unit(), unit().requires_grad_(), unit().requires_grad_()
    labels = torch.arange(32).repeat_interleave(8)

    def run() -> float:
        for _ in range(5):
            losses.mcl_loss(rev, old, new, labels, 0.1).backward()
        t0 = time.perf_counter()
        for _ in range(repeats):
            losses.mcl_loss(rev, old, new, labels, 0.1).backward()
        return 1000 * (time.perf_counter() - t0) / repeats

    now = run()
    with mock.patch.object(losses, "hardest_half", hardest_half_by_sort):
        full_sort = run()
    return {"mcl_forward_backward_ms": now, "with_full_sort_mining_ms": full_sort}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    args = p.parse_args()
    bench = Benchmark("transform_step", args.out)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 100)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    old, new = unit(rng.normal(size=(10_000, 128))), unit(rng.normal(size=(10_000, 128)))
    fit_transforms(TransformConfig(objective="rqt", epochs=1), old, new, labels,
                   progress=False)  # warm-up: the first fit of a process pays start-up
    steps = {}
    for hidden in args.widths:
        for name in NAMES:
            steps[f"{name}@{hidden}"] = step_ms(name, hidden, old, new, labels)
            print(f"{name:8s} hidden {hidden:5d}: {steps[f'{name}@{hidden}']:6.1f} ms/step",
                  flush=True)
    loss = loss_ms()
    print(f"MCL loss, 256 items, forward+backward: {loss['mcl_forward_backward_ms']:.1f} ms "
          f"(full-sort mining: {loss['with_full_sort_mining_ms']:.1f} ms)")
    bench.write({"ms_per_step": steps, "loss": loss},
                {"batch": "32 classes x 8 items", "items": len(labels), "dim": 128,
                 "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
