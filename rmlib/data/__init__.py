"""Data: the CIFAR-100 and Market-1501 readers, the old/new protocol, tensor augmentation.

Explained in the book: book/data_protocol.
"""

from rmlib.data.cifar import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    ImageSet,
    cifar100_dir,
    fetch_cifar100,
    load_cifar100,
    old_class_mask,
    train_val_split,
)
from rmlib.data.market import (
    MARKET_DIRNAME,
    MarketSplit,
    load_market1501,
    make_synthetic_market,
    market_old_ids,
    parse_market_name,
)

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ImageSet",
    "MARKET_DIRNAME",
    "MarketSplit",
    "cifar100_dir",
    "fetch_cifar100",
    "load_cifar100",
    "load_market1501",
    "make_synthetic_market",
    "market_old_ids",
    "old_class_mask",
    "parse_market_name",
    "train_val_split",
]
