"""Backbones: their config, and their training through the engine's one loop.

Every run is a function of its config: it lives in
`<runs>/<dataset>/<profile>/<role>-<config key>/`, writes a checkpoint every epoch, resumes
from it after an interruption, and is reused only when the key matches. Checkpoints hold
tensors and plain numbers only, so they load with `torch.load(..., weights_only=True)`.

Explained in the book: book/models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmlib import RmlibError
from rmlib.config import cpu_has_fast_bf16, default_device
from rmlib.data import CIFAR100_MEAN, CIFAR100_STD, ImageSet
from rmlib.data.augment import random_crop_flip, random_erase
from rmlib.data.sampling import pk_batch_count, pk_batches
from rmlib.engine.fast_training import (
    alternating_flips,
    dirac_init,
    parameter_groups,
    set_bn_momentum,
    weight_average,
    whiten_stem,
)
from rmlib.engine.loop import Optimisation, train_epochs
from rmlib.engine.objectives import Objective
from rmlib.engine.runs import config_key, run_dir
from rmlib.models import RetrievalModel, build_backbone
from rmlib.outputs import save_torch, write_json


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
    # Market-1501
    sampler: tuple[int, int] | None = None  # (P identities, K images each) per batch
    erase: float = 0.0  # random-erasing probability
    image_size: tuple[int, int] | None = None
    # Progressive resizing: the first `low_res_epochs` epochs see the images downscaled to
    # `low_res` pixels (about half the compute of full size), the rest at full size.
    low_res_epochs: int = 0
    low_res: int = 24
    # Fast-training options (rmlib.engine.fast_training), each off by default
    whiten: bool = False  # first conv fixed to the whitening of the training patches
    dirac: bool = False  # identity-initialised convolutions
    bn_bias_lr: float = 1.0  # learning-rate multiplier of the BatchNorm biases
    ema: float = 0.0  # decay of a moving average of the weights, which is what is kept
    bn_momentum: float = 0.1
    flip: str = "random"  # or "alternating" between epochs

    def __post_init__(self) -> None:
        if self.flip not in ("random", "alternating"):
            raise RmlibError(f"flip={self.flip!r}; use 'random' or 'alternating'")

    def key(self) -> str:
        return config_key(self)

    def run_dir(self, runs: Path) -> Path:
        return run_dir(runs, self.dataset, self.profile, self.role, self)


def precision_mode(device: torch.device, override: str | None = None) -> torch.dtype | None:
    """The autocast dtype for this device: fp16/bf16 on CUDA, bf16 on CPUs with bf16 units,
    else None (fp32; emulated bf16 is slower than fp32). `override`: "fp32" or "bf16"."""
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
    """Linear warm-up to the peak learning rate, then linear decay to zero.

    Kept as a lambda rather than OneCycleLR: OneCycleLR's linear mode starts at
    peak / div_factor and cycles the momentum, which would change every trained backbone.
    """
    peak = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return factor


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


def _optimisation(model: nn.Module, config: BackboneConfig, steps: int) -> Optimisation:
    """Nesterov SGD, no weight decay on biases and norms (BatchNorm biases at their own
    learning rate), the warm-up/decay schedule, and the weight average if the recipe asks."""
    groups = parameter_groups(model, config.lr, config.weight_decay, config.bn_bias_lr)
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps * config.epochs, config.warmup))
    average = weight_average(model, config.ema) if config.ema else None
    return Optimisation(optimizer, scheduler,
                        "training diverged at epoch {epoch}; lower the learning rate",
                        average, model)


def _prepare(model: RetrievalModel, config: BackboneConfig, data: _TrainingImages) -> None:
    """The recipe's initialisation: whitening stem, dirac convolutions, BatchNorm momentum."""
    if config.whiten:
        if config.arch != "fast":
            raise RmlibError(f"the whitening stem is for the 'fast' backbone's 3x3 stem, not "
                             f"{config.arch!r}; drop whiten from the recipe")
        # The first 5,000 training images (CIFAR's order is random; no random numbers are
        # drawn) at full resolution, also for the low-resolution epochs: BatchNorm follows
        # the stem, and this is the stem benchmarks/backbone_recipes.py measured.
        sample = data.images[:5000].cpu()
        whiten_stem(model.backbone, normalise(sample, config.mean, config.std))
    if config.dirac:
        dirac_init(model.backbone)
    set_bn_momentum(model, config.bn_momentum)


def _finished(config: BackboneConfig, folder: Path, device: torch.device) -> TrainedModel | None:
    """The cached result of a finished run, if there is one."""
    if not (folder / "model.pt").exists():
        return None
    model = build_model(config)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    history = json.loads((folder / "history.json").read_text())
    return TrainedModel(model.to(device).eval(), config, history, folder, reused=True)


class _TrainingImages:
    """The training set on the device, and its low-resolution copy, made once if needed."""

    def __init__(self, config: BackboneConfig, train: ImageSet, device: torch.device):
        self.config = config
        self.images = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
        self.labels = torch.from_numpy(train.labels).to(device)
        self._low_res: torch.Tensor | None = None

    def at(self, epoch: int) -> tuple[torch.Tensor, int]:
        """The images of `epoch` and their crop padding (progressive resizing)."""
        c = self.config
        if epoch >= c.low_res_epochs:
            return self.images, c.padding
        if self._low_res is None:
            self._low_res = downscale(self.images, c.low_res)
        return self._low_res, max(1, round(c.padding * c.low_res / min(self.images.shape[-2:])))

    def batches(self, model: nn.Module, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch's augmented, normalised batches (x, y): random or P x K batches, then
        crops, flips and erasing, all drawn from one generator seeded by the epoch."""
        c, labels = self.config, self.labels
        model.train()
        images, padding = self.at(epoch)
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
        flips = alternating_flips(len(labels), c.seed, epoch) if c.flip == "alternating" \
            else None
        if c.sampler is None:
            order = torch.randperm(len(labels), generator=gen).split(c.batch_size)
        else:
            order = pk_batches(labels.cpu(), *c.sampler, gen)
        for idx in order:
            idx = idx.to(images.device)
            flip = None if flips is None else flips[idx.cpu()]
            x = normalise(random_crop_flip(images[idx], padding, gen, flip), c.mean, c.std)
            if c.erase > 0:
                x = random_erase(x.cpu(), gen, p=c.erase).to(images.device)
            yield x.contiguous(memory_format=torch.channels_last), labels[idx]


def train_backbone(
    config: BackboneConfig, train: ImageSet, objective: Objective | None = None, *,
    runs: Path, device: torch.device | None = None, precision: str | None = None,
    progress: bool = True, stop_after_epochs: int | None = None,
) -> TrainedModel:
    """Train (or load from the cache under `runs`, or resume) a backbone on `train`.

    `stop_after_epochs` ends the call early, leaving a checkpoint behind: it simulates an
    interruption (tests) and lets long runs be done in pieces.
    """
    objective = objective or Objective()
    config = replace(config, objective=objective.spec)
    device = device or default_device()
    folder = config.run_dir(runs)
    done = _finished(config, folder, device)
    if done is not None:
        return done
    if int(train.labels.max()) >= config.num_classes:
        raise RmlibError(f"labels go up to {int(train.labels.max())} but the model has "
                         f"{config.num_classes} classes; filter the training set first")
    write_json(folder / "config.json", asdict(config))
    model = build_model(config).to(device).to(memory_format=torch.channels_last)
    data = _TrainingImages(config, train, device)
    _prepare(model, config, data)
    opt = _optimisation(model, config, _steps_per_epoch(config, train.labels))
    history, start = _resume(folder / "checkpoint.pt", model, opt, device)
    dtype = precision_mode(device, precision)

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            embedding, logits = model(x)
            loss = objective(model, embedding, logits.float(), y, config)
        return loss, len(y), {"train_acc": (logits.argmax(1) == y).sum()}

    def end_epoch(epoch: int, record: dict, items: int) -> None:
        record.update(lr=opt.optimizer.param_groups[0]["lr"],
                      images_per_s=items / record["seconds"])
        if progress:
            print(f"{config.role} epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.3f} "
                  f"train acc {record['train_acc']:.3f} ({record['images_per_s']:.0f} img/s)",
                  flush=True)
        save_torch(folder / "checkpoint.pt",
                   {"model": model.state_dict(), **opt.state(), "history": history,
                    "epoch": epoch + 1})

    stop = config.epochs if stop_after_epochs is None else min(config.epochs,
                                                               start + stop_after_epochs)
    train_epochs(range(start, stop), lambda epoch: data.batches(model, epoch), loss_of, opt,
                 history, config.role, config.epochs, progress, end_epoch)
    kept = (opt.average.module if opt.average is not None else model).eval()
    if len(history) == config.epochs:
        write_json(folder / "history.json", history)  # model.pt last: it marks a finished run
        save_torch(folder / "model.pt", kept.state_dict())
        (folder / "checkpoint.pt").unlink(missing_ok=True)
    return TrainedModel(kept, config, history, folder)


def _resume(checkpoint: Path, model: nn.Module, opt: Optimisation, device: torch.device
            ) -> tuple[list[dict], int]:
    """(history, next epoch) of an interrupted run, its state loaded; ([], 0) if none."""
    if not checkpoint.exists():
        return [], 0
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load(state)
    return state["history"], int(state["epoch"])


def downscale(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """The whole training set resized (antialiased) so that its shorter side is `size`."""
    h, w = images_uint8.shape[-2:]
    out_hw = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
    chunks = [F.interpolate(chunk.float(), size=out_hw, mode="bilinear", antialias=True,
                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
              for chunk in images_uint8.split(4096)]
    return torch.cat(chunks)


def _steps_per_epoch(config: BackboneConfig, labels: np.ndarray) -> int:
    if config.sampler is None:
        return math.ceil(len(labels) / config.batch_size)
    return pk_batch_count(labels, *config.sampler)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
