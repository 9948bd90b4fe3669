"""Backbones, the L2-normalised embedding head, the cosine classifier, and psi / rho.

- `FastResNet`: an airbench-style net for 32x32 inputs, fast on a CPU (the cpu profile);
- `resnet18_cifar`: torchvision's ResNet-18 with a CIFAR stem (3x3 conv, no max-pool);
- `RetrievalModel`: backbone -> linear -> L2-normalised 128-d embedding -> cosine classifier.
  The cosine classifier scores normalised embeddings, so training shapes the very space
  that retrieval searches with Euclidean distance.

Explained in the book: book/models, book/rho.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.GELU())


class _PoolBlock(nn.Module):
    """conv -> max-pool -> BN -> GELU -> conv-BN-GELU, with a residual over the second conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.res = _conv_bn(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn(F.max_pool2d(self.conv(x), 2)))
        return x + self.res(x)


class FastResNet(nn.Module):
    """A small residual net for 32x32 images (after Keller Jordan's airbench)."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), stem: int = 24):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(stem), nn.GELU())
        blocks, c = [], stem
        for w in widths:
            blocks.append(_PoolBlock(c, w))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return torch.amax(x, dim=(2, 3))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (a 1x1 projection where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n + 2: three stages of n basic blocks, widths
    16/32/64 by default): deep, narrow and residual, unlike the fast net, so that an
    upgrade from it to the fast net is one across architectures."""

    def __init__(self, depth: int = 20, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, ...), not {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(_BasicBlock(c, w, 2 if stage and i == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.out_features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


def resnet18_cifar() -> nn.Module:
    """ResNet-18 with a CIFAR stem (3x3 stride-1 first conv, no max-pool), 512-d features."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_features = 512
    return net


def _cached_imagenet_weights(name: str):
    """torchvision's ImageNet weights if they are already on disk; never downloads."""
    import torchvision.models as tvm

    weights = {"resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
               "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1}[name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return weights if path.exists() else None


def reid_resnet(depth: int = 18) -> nn.Module:
    """A re-id ResNet for person crops: last stage stride 1 (finer maps), global average pool.

    ImageNet-initialised when torchvision's weights are cached locally, from scratch
    otherwise; `pretrained` says which.
    """
    import torchvision.models as tvm

    name = f"resnet{depth}"
    weights = _cached_imagenet_weights(name)
    net = getattr(tvm, name)(weights=weights)
    net.layer4[0].conv1.stride = (1, 1) if depth == 18 else net.layer4[0].conv1.stride
    if depth != 18:
        net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    net.out_features = net.fc.in_features
    net.fc = nn.Identity()
    net.pretrained = weights is not None
    return net


def build_backbone(arch: str, widths: tuple[int, ...] | None = None) -> nn.Module:
    if arch == "fast":
        return FastResNet(tuple(widths) if widths else (32, 64, 128))
    if arch == "resnet18":
        return resnet18_cifar()
    if arch == "resnet20":
        return CifarResNet(20, tuple(widths) if widths else (16, 32, 64))
    if arch in ("reid18", "reid50"):
        return reid_resnet(int(arch[4:]))
    raise ValueError(f"unknown backbone {arch!r}; use 'fast', 'resnet18', 'resnet20', "
                     "'reid18' or 'reid50'")


class CosineClassifier(nn.Module):
    """logits = scale * cos(embedding, class weight): a classifier for normalised embeddings."""

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(embedding, dim=1), F.normalize(self.weight, dim=1))


class RetrievalModel(nn.Module):
    """Backbone + linear head whose output is L2-normalised, + a cosine classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, dim: int = 128,
                 scale: float = 16.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, dim)
        self.classifier = CosineClassifier(dim, num_classes, scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.classifier(z)


class EmbeddingTransform(nn.Module):
    """A small MLP between embedding spaces with an L2-normalised output.

    psi (new -> old, the reverse query transform), rho (new -> new, the learnable new
    embedding; `residual=True` starts it at the identity) and FCT's h (old -> new).
    """

    def __init__(self, d_in: int, d_out: int, hidden: int = 512, residual: bool = False,
                 layers: int = 2):
        super().__init__()
        if residual and d_in != d_out:
            raise ValueError("a residual transform needs d_in == d_out")
        if layers < 1:
            raise ValueError(f"a transform needs at least one hidden layer, got {layers}")
        self.d_in, self.d_out, self.hidden, self.residual = d_in, d_out, hidden, residual
        self.layers = layers
        blocks: list[nn.Module] = []
        for i in range(layers):  # `layers` hidden layers of width `hidden`
            blocks += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden),
                       nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, d_out))
        if residual:  # start as the identity map
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return F.normalize(x + y if self.residual else y, dim=1)


class LinearMap(nn.Module):
    """A linear (or, with `bias`, affine) map with an L2-normalised output: a closed-form
    psi (`rmlib.engine.closed_form`), whose weights are solved for, not trained."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.d_in, self.d_out, self.hidden = d_in, d_out, 0
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1)


class MlFctTransform(nn.Module):
    """FCT's transformation as apple/ml-fct builds it for CIFAR-100 without
    side-information (where the side input is the old embedding itself): two projections of
    the old embedding (d -> 2d -> 2 d_out each), a mixer (4 d_out -> hidden -> hidden ->
    d_out, `hidden` 2048 there), BatchNorm and ReLU between layers, and an output that is
    not normalised. A 1x1 convolution on a 1x1 map is a linear layer, as here."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 2048):
        super().__init__()
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden

        def block(a: int, b: int) -> list[nn.Module]:
            return [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU()]

        self.p1 = nn.Sequential(*block(d_in, 2 * d_in), *block(2 * d_in, 2 * d_out))
        self.p2 = nn.Sequential(*block(d_in, 2 * d_in), *block(2 * d_in, 2 * d_out))
        self.mixer = nn.Sequential(*block(4 * d_out, hidden), *block(hidden, hidden),
                                   nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(torch.cat([self.p1(x), self.p2(x)], dim=1))

