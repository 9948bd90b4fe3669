"""Batched embedding extraction with an on-disk cache next to the model that made it.

Explained in the book: book/models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from rmlib.engine.backbones import TrainedModel, normalise, precision_mode
from rmlib.outputs import cached, save_npy

VIEWS = ("none", "flip", "flip+shift")


def test_time_views(batch: torch.Tensor, views: str) -> list[torch.Tensor]:
    """The views of a uint8 batch whose embeddings are summed: the images ("none"), and
    their mirror images ("flip"), and both shifted by one pixel up-left and down-right
    ("flip+shift", airbench's multi-crop test-time augmentation)."""
    if views not in VIEWS:
        raise ValueError(f"unknown test-time views {views!r}; use one of {VIEWS}")
    out = [batch] if views == "none" else [batch, batch.flip(3)]
    if views == "flip+shift":
        h, w = batch.shape[-2:]
        padded = torch.nn.functional.pad(batch, (1, 1, 1, 1))
        for d in (0, 2):
            shifted = padded[..., d:d + h, d:d + w]
            out += [shifted, shifted.flip(3)]
    return out


@torch.no_grad()
def extract_embeddings(trained: TrainedModel, images: np.ndarray, batch_size: int = 1000,
                       views: str = "flip", precision: str | None = None) -> np.ndarray:
    """L2-normalised embeddings of uint8 images (N, C, H, W), float32 (N, dim).

    The embeddings of each image's `views` (see `test_time_views`) are summed and
    re-normalised: "flip" averages an image and its mirror image, a cheap, standard
    test-time augmentation for retrieval.
    """
    model, cfg = trained.model.eval(), trained.config
    device = next(model.parameters()).device
    dtype = precision_mode(device, precision)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        z = 0
        for view in test_time_views(batch.to(device), views):
            x = normalise(view, cfg.mean, cfg.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                z = z + model.embed(x)
        out.append(torch.nn.functional.normalize(z.float(), dim=1).cpu())
    return torch.cat(out).numpy()


def images_digest(images: np.ndarray) -> str:
    """A short content hash of an image array, so the cache key follows the data."""
    h = hashlib.sha1()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images[:: max(1, len(images) // 256)]).tobytes())
    return h.hexdigest()[:12]


def cached_embeddings(trained: TrainedModel, images: np.ndarray, name: str,
                      views: str = "flip", precision: str | None = None) -> np.ndarray:
    """Extract once per (model, images, views); later calls read `<run>/embeddings/*.npy`."""
    path = Path(trained.run_dir) / "embeddings" / f"{name}-{images_digest(images)}-{views}.npy"
    return cached(path, lambda: extract_embeddings(trained, images, views=views,
                                                   precision=precision), save_npy, np.load)
