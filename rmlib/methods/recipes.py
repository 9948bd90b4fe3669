"""How each profile trains each data set's backbones: a data set's recipes are its own,
one per profile, and come with its registry entry (`Dataset.recipes`); a new data set
brings its own, and no other file needs a field for it.

Explained in the book: book/models, book/market1501.
"""

from __future__ import annotations

from dataclasses import dataclass

from rmlib import RmlibError


@dataclass(frozen=True)
class CifarRecipe:
    """How a profile trains the CIFAR-100 backbones (old: classes 0-49, new: all 100).

    `low_res_epochs_*` of the epochs see the images at 24 px (progressive resizing, chosen
    by benchmarks/backbone_recipes.py on a validation split). `*_per_class` take a small
    class-balanced subset (the smoke profile); None keeps every image.
    """

    arch: str
    widths: tuple[int, ...]
    epochs_old: int
    epochs_new: int
    batch_size: int = 256
    lr: float = 0.2
    low_res_epochs_old: int = 0
    low_res_epochs_new: int = 0
    train_per_class: int | None = None
    test_per_class: int | None = None
    tta: str = "flip"  # test-time views of query and gallery images (rmlib.engine.embed)
    options: tuple[tuple[str, object], ...] = ()  # fast-training options (BackboneConfig)

    def __post_init__(self) -> None:
        _check_views(self.tta)


@dataclass(frozen=True)
class MarketRecipe:
    """How a profile trains the Market-1501 backbones (a re-id ResNet, P x K batches)."""

    arch: str
    image_size: tuple[int, int]
    epochs_old: int
    epochs_new: int
    sampler: tuple[int, int] = (16, 4)
    lr: float = 0.05
    padding: int = 8
    erase: float = 0.5
    triplet_margin: float = 0.3
    tta: str = "flip"

    def __post_init__(self) -> None:
        _check_views(self.tta)


def _check_views(views: str) -> None:
    """Refuse unknown test-time views when the recipe is made, not after training."""
    if views not in ("none", "flip", "flip+shift"):
        raise RmlibError(f"tta={views!r}; use 'none', 'flip' or 'flip+shift'")


# The cpu backbones' fast-training options: those of benchmarks/backbone_recipes.py that
# raised the old model's validation mAP on their own (whitening +2.7 pt, BN-bias lr x8 +1.2,
# label smoothing 0.2 +1.0); together, on a 64-128-256 net for 14 epochs, 45.2 against the
# previous recipe's 28.7, and multi-crop test-time views add 1.4 more.
CPU_FAST_TRAINING = (("whiten", True), ("bn_bias_lr", 8.0), ("label_smoothing", 0.2))

CIFAR_RECIPES = {
    "smoke": CifarRecipe("fast", (16, 32, 64), 1, 1, batch_size=128, lr=0.1,
                         train_per_class=20, test_per_class=10),
    "cpu": CifarRecipe("fast", (64, 128, 256), 14, 14, low_res_epochs_old=11,
                       low_res_epochs_new=11, tta="flip+shift", options=CPU_FAST_TRAINING),
    "paper": CifarRecipe("resnet18", (), 30, 30),
}

MARKET_RECIPES = {
    "smoke": MarketRecipe("reid18", (64, 32), 1, 1, sampler=(4, 4), padding=4),
    "cpu": MarketRecipe("reid18", (128, 64), 10, 10),
    "paper": MarketRecipe("reid50", (256, 128), 60, 60, padding=10),
}
