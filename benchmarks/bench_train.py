"""Benchmark: training throughput (images/s) of each backbone on this machine, and what it
implies for a full run.

    python -m benchmarks.bench_train [--out F]

Times forward + backward + SGD step on random batches (after warm-up), in fp32 and, where
the CPU has bf16 units (or on CUDA), in the autocast mode the training loop chooses.
Market-1501's epoch time and the cost of a full Table 1 run (old, new, BCT, BiCT) follow
from the measured rate at each resolution and the profile's epochs.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from benchmarks.common import Benchmark, parser
from rmlib.config import cpu_has_fast_bf16, default_device
from rmlib.engine.backbones import precision_mode
from rmlib.methods.recipes import MARKET_RECIPES
from rmlib.models import RetrievalModel, build_backbone

MARKET_TRAIN_IMAGES, MARKET_OLD_IMAGES = 12_936, 6_468  # approximately half the images
# An assumption, not a measurement: a Colab T4 trains ResNet-50 at 256x128 with fp16 at
# roughly 250 images/s; used only for the GPU estimate, and labelled so.
ASSUMED_T4_IMAGES_PER_S = {"reid50@256x128": 250.0}


def rate(arch: str, size: tuple[int, int], batch: int, dtype, device, steps: int = 4) -> float:
    model = RetrievalModel(build_backbone(arch, (32, 64, 128)), 100).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            _, logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / min(times[1:])


def main() -> None:
    args = parser(__doc__).parse_args()
    bench = Benchmark("train_throughput", args.out)
    device = default_device()
    mode = precision_mode(device, bench.config.precision)
    cases = [("fast", (32, 32), 256), ("resnet18", (32, 32), 64),
             ("reid18", (128, 64), 32), ("reid18", (256, 128), 16), ("reid50", (256, 128), 8)]
    out = {"device": str(device), "cpu_has_bf16_units": cpu_has_fast_bf16(),
           "chosen_autocast": str(mode), "images_per_s": {}}
    for arch, size, batch in cases:
        key = f"{arch}@{size[0]}x{size[1]}"
        entry = {"fp32": round(rate(arch, size, batch, None, device), 1)}
        if mode is not None:
            entry[str(mode).replace("torch.", "")] = round(rate(arch, size, batch, mode, device), 1)
        out["images_per_s"][key] = entry
        print(key, entry, flush=True)
    estimates = {}
    for profile in ("cpu", "paper"):
        m = MARKET_RECIPES[profile]
        key = f"{m.arch}@{m.image_size[0]}x{m.image_size[1]}"
        if key not in out["images_per_s"]:
            continue
        r = max(out["images_per_s"][key].values())
        images = m.epochs_old * MARKET_OLD_IMAGES + 3 * m.epochs_new * MARKET_TRAIN_IMAGES
        estimates[profile] = {
            "backbone": key, "epoch_seconds_here": round(MARKET_TRAIN_IMAGES / r),
            "full_run_hours_here": round(images / r / 3600, 1),
            "trained_images": images}
        if key in ASSUMED_T4_IMAGES_PER_S:
            estimates[profile]["full_run_hours_on_T4_assumed"] = round(
                images / ASSUMED_T4_IMAGES_PER_S[key] / 3600, 1)
    out["market1501_estimates"] = estimates
    print(json.dumps(out["market1501_estimates"], indent=2))
    bench.write(out, {"cases": cases})


if __name__ == "__main__":
    main()
