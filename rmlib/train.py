"""One training loop for every backbone; the objective plugs in (plain, BCT, BiCT).

Every run is a function of its config: it lives in
`runs/<dataset>/<profile>/<role>-<config hash>/`, writes a checkpoint every epoch, resumes
from it after an interruption, and is reused only when the hash matches. Checkpoints hold
tensors and plain numbers only, so they load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmlib import RmlibError
from rmlib.config import config_key, cpu_has_fast_bf16, default_device, runs_root
from rmlib.data import CIFAR100_MEAN, CIFAR100_STD, ImageSet
from rmlib.data.augment import random_crop_flip, random_erase
from rmlib.data.sampling import pk_batches
from rmlib.losses import batch_hard_triplet_loss
from rmlib.models import RetrievalModel, build_backbone
from rmlib.outputs import atomic_write, write_json

# Fields added after runs were cached: at their defaults they stay out of the cache key, so
# that those runs keep their keys.
_KEYED_ONLY_WHEN_SET = ("sampler", "erase", "image_size", "low_res_epochs", "low_res")


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that determines a trained backbone (and so its cache key)."""

    dataset: str = "cifar100"
    profile: str = "cpu"
    role: str = "new"
    num_classes: int = 100
    arch: str = "fast"
    widths: tuple[int, ...] = (32, 64, 128)
    dim: int = 128
    scale: float = 16.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2
    warmup: float = 0.2  # fraction of steps with a rising learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    padding: int = 4
    seed: int = 0
    mean: tuple[float, ...] = CIFAR100_MEAN
    std: tuple[float, ...] = CIFAR100_STD
    objective: dict = field(default_factory=lambda: {"name": "ce"})
    # Added with Market-1501 (keyed only when set).
    sampler: tuple[int, int] | None = None  # (P identities, K images each) per batch
    erase: float = 0.0  # random-erasing probability
    image_size: tuple[int, int] | None = None
    # Progressive resizing: the first `low_res_epochs` epochs see the images downscaled to
    # `low_res` pixels (about half the compute of full size), the rest at full size.
    low_res_epochs: int = 0
    low_res: int = 24

    def key(self) -> str:
        return config_key(self, _KEYED_ONLY_WHEN_SET)

    def run_dir(self) -> Path:
        return runs_root() / self.dataset / self.profile / f"{self.role}-{self.key()}"


class Objective:
    """The loss of a training step. Subclasses (BCT, BiCT) add terms; `spec` enters the hash."""

    spec: dict = {"name": "ce"}

    def __call__(self, model: RetrievalModel, embedding: torch.Tensor, logits: torch.Tensor,
                 labels: torch.Tensor, config: BackboneConfig) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)


class TripletObjective(Objective):
    """Cross-entropy with label smoothing plus a batch-hard triplet loss (re-id)."""

    def __init__(self, margin: float = 0.3):
        self.margin = margin
        self.spec = {"name": "ce+triplet", "margin": margin}

    def __call__(self, model, embedding, logits, labels, config):
        ce = super().__call__(model, embedding, logits, labels, config)
        return ce + batch_hard_triplet_loss(embedding.float(), labels, self.margin)


def precision_mode(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device: fp16/bf16 on CUDA, bf16 on CPUs with bf16 units,
    else None (fp32; emulated bf16 is slower than fp32)."""
    override = os.environ.get("RMLIB_PRECISION")
    if override == "fp32":
        return None
    if override == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def normalise(images_uint8: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    m = torch.tensor(mean, device=images_uint8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images_uint8.device).view(1, -1, 1, 1)
    return ((images_uint8.float() / 255.0) - m) / s


def build_model(config: BackboneConfig) -> RetrievalModel:
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.arch, config.widths)
    return RetrievalModel(backbone, config.num_classes, config.dim, config.scale)


def _lr_lambda(total_steps: int, warmup: float) -> Callable[[int], float]:
    peak = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:  # linear up to the peak, then linear down to zero
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return factor


def optimisation_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, advice: str) -> None:
    """One step of every training loop here: refuse a non-finite loss (with `advice`),
    then backward, optimizer and schedule."""
    if not torch.isfinite(loss):
        raise RmlibError(f"{advice} (loss {loss.item()})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def _save_atomic(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclass
class TrainedModel:
    model: RetrievalModel
    config: BackboneConfig
    history: list[dict]
    run_dir: Path
    reused: bool = False

    @property
    def wall_time_s(self) -> float:
        return float(sum(h["seconds"] for h in self.history))


def train_backbone(
    config: BackboneConfig, train: ImageSet, objective: Objective | None = None,
    device: torch.device | None = None, progress: bool = True,
    stop_after_epochs: int | None = None,
) -> TrainedModel:
    """Train (or load from the cache, or resume) a backbone on `train` with `objective`.

    `stop_after_epochs` ends the call early, leaving a checkpoint behind: it simulates an
    interruption (tests) and lets long runs be done in pieces.
    """
    objective = objective or Objective()
    if objective.spec != config.objective:
        config = replace(config, objective=objective.spec)
    device = device or default_device()
    run_dir = config.run_dir()
    final = run_dir / "model.pt"
    model = build_model(config)
    if final.exists():
        model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
        history = json.loads((run_dir / "history.json").read_text())
        return TrainedModel(model.to(device).eval(), config, history, run_dir, reused=True)
    if int(train.labels.max()) >= config.num_classes:
        raise RmlibError(f"labels go up to {int(train.labels.max())} but the model has "
                         f"{config.num_classes} classes; filter the training set first")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", asdict(config))

    model = model.to(device).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True)
    steps_per_epoch = _steps_per_epoch(config, train.labels)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps_per_epoch * config.epochs, config.warmup))
    history: list[dict] = []
    start_epoch = 0
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = state["history"], int(state["epoch"])

    images = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
    labels = torch.from_numpy(train.labels).to(device)
    dtype = precision_mode(device)
    from tqdm.auto import tqdm

    last_epoch = config.epochs if stop_after_epochs is None else min(
        config.epochs, start_epoch + stop_after_epochs)
    low_res_images = None
    for epoch in range(start_epoch, last_epoch):
        model.train()
        if epoch < config.low_res_epochs:
            if low_res_images is None:
                low_res_images = downscale(images, config.low_res)
            epoch_images, padding = low_res_images, _scaled_padding(config, images)
        else:
            epoch_images, padding = images, config.padding
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        batches = _epoch_batches(config, labels.cpu(), gen)
        t0 = time.time()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(batches, desc=f"{config.role} epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False, mininterval=2.0)
        for step, idx in enumerate(bar):
            idx = idx.to(device)
            batch = random_crop_flip(epoch_images[idx], padding, gen)
            x = normalise(batch, config.mean, config.std)
            if config.erase > 0:
                x = random_erase(x.cpu(), gen, p=config.erase).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                embedding, logits = model(x)
                loss = objective(model, embedding, logits.float(), y, config)
            optimisation_step(loss, optimizer, scheduler,
                              f"training diverged at epoch {epoch + 1}; lower the learning rate")
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0,
                        "images_per_s": seen / (time.time() - t0)})
        if progress:
            h = history[-1]
            print(f"{config.role} epoch {epoch + 1}/{config.epochs}: loss {h['loss']:.3f} "
                  f"train acc {h['train_acc']:.3f} ({h['images_per_s']:.0f} img/s)", flush=True)
        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "history": history,
                      "epoch": epoch + 1}, checkpoint)
    model.eval()
    if len(history) == config.epochs:
        _save_atomic(model.state_dict(), final)
        write_json(run_dir / "history.json", history)
        checkpoint.unlink(missing_ok=True)
    return TrainedModel(model, config, history, run_dir)


def downscale(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """The whole training set resized (antialiased) so that its shorter side is `size`."""
    h, w = images_uint8.shape[-2:]
    out_hw = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
    chunks = [F.interpolate(chunk.float(), size=out_hw, mode="bilinear", antialias=True,
                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
              for chunk in images_uint8.split(4096)]
    return torch.cat(chunks)


def _scaled_padding(config: BackboneConfig, images: torch.Tensor) -> int:
    return max(1, round(config.padding * config.low_res / min(images.shape[-2:])))


def _steps_per_epoch(config: BackboneConfig, labels: np.ndarray) -> int:
    if config.sampler is None:
        return math.ceil(len(labels) / config.batch_size)
    p, k = config.sampler
    groups = sum(math.ceil(int(n) / k) for n in np.unique(labels, return_counts=True)[1])
    return math.ceil(groups / p)


def _epoch_batches(config: BackboneConfig, labels: torch.Tensor, gen: torch.Generator
                   ) -> list[torch.Tensor]:
    """Random batches, or P x K identity batches when the config asks for a sampler."""
    if config.sampler is None:
        return list(torch.randperm(len(labels), generator=gen).split(config.batch_size))
    p, k = config.sampler
    return pk_batches(labels, p, k, gen)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
