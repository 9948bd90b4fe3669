"""Techniques of the fastest CIFAR training recipes, each a backbone recipe option.

After Keller Jordan's airbench (github.com/KellerJordan/cifar10-airbench, its ablations
count the epochs each saves on CIFAR-10): a first convolution fixed to the whitening of
the training set's patches, identity (dirac) initialisation of the convolutions, a larger
learning rate on the BatchNorm biases, an exponential moving average of the weights with
a faster BatchNorm momentum, and flips that alternate between epochs instead of being
drawn anew. Test-time augmentation (flips and 1-pixel shifts) lives in `rmlib.engine.embed`.

Explained in the book: book/models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def patch_whitening(images: torch.Tensor, kernel: int, filters: int, eps: float = 5e-4
                    ) -> torch.Tensor:
    """Conv weights (filters, C, k, k) that whiten the k x k patches of `images` (a float,
    normalised sample): the top filters/2 principal directions scaled by 1/sqrt(variance),
    and their negatives (so that a GELU after them keeps both signs)."""
    c, half = images.shape[1], filters // 2
    total, outer, count = torch.zeros(c * kernel ** 2, dtype=torch.float64), 0.0, 0
    for chunk in images.split(250):  # patches of 250 images at a time: bounded memory
        patches = nn.functional.unfold(chunk.double(), kernel).transpose(1, 2)
        patches = patches.reshape(-1, c * kernel ** 2)
        total, outer, count = total + patches.sum(0), outer + patches.T @ patches, \
            count + len(patches)
    mean = total / count
    cov = outer / count - mean[:, None] * mean[None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    top = eigenvectors[:, -half:].flip(1) / (eigenvalues[-half:].flip(0) + eps).sqrt()
    weights = top.T.reshape(half, c, kernel, kernel)
    return torch.cat([weights, -weights]).float()


def whiten_stem(model: nn.Module, images: torch.Tensor) -> None:
    """Fix the backbone's first convolution to the whitening of `images`' patches; it is not
    trained (its BatchNorm still is)."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    weights = patch_whitening(images, conv.kernel_size[0], conv.out_channels)
    with torch.no_grad():
        conv.weight.copy_(weights)
    conv.weight.requires_grad_(False)


def dirac_init(model: nn.Module) -> None:
    """Identity-initialise every convolution after the first on its first in_channels
    filters, so that each block starts close to passing its input through."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1:]
    with torch.no_grad():
        for conv in convs:
            n = min(conv.in_channels, conv.out_channels)
            nn.init.dirac_(conv.weight[:n])


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, bn_bias_lr: float
                     ) -> list[dict]:
    """Weight decay on weights (ndim > 1) only; BatchNorm biases at `bn_bias_lr` x lr;
    frozen parameters (the whitening) left out."""
    bn_biases = {id(m.bias) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.ndim <= 1 and id(p) not in bn_biases],
         "weight_decay": 0.0},
        {"params": [p for p in trained if id(p) in bn_biases], "weight_decay": 0.0,
         "lr": lr * bn_bias_lr},
    ]
    return [g for g in groups if g["params"]]


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights and the BatchNorm statistics."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of n images to mirror in `epoch`: a random half in epoch 0, then each image's
    choice flips every epoch, so that every image is seen both ways in any two epochs."""
    base = torch.rand(n, generator=torch.Generator().manual_seed(seed + 7_919)) < 0.5
    return base ^ bool(epoch % 2)
