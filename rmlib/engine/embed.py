"""Batched embedding extraction with an on-disk cache next to the model that made it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from rmlib.engine.backbones import TrainedModel, normalise, precision_mode
from rmlib.outputs import cached, save_npy


@torch.no_grad()
def extract_embeddings(trained: TrainedModel, images: np.ndarray, batch_size: int = 1000,
                       flip: bool = True, precision: str | None = None) -> np.ndarray:
    """L2-normalised embeddings of uint8 images (N, C, H, W), float32 (N, dim).

    With `flip`, the embedding of each image and of its mirror image are averaged and
    re-normalised (a cheap, standard test-time augmentation for retrieval).
    """
    model, cfg = trained.model.eval(), trained.config
    device = next(model.parameters()).device
    dtype = precision_mode(device, precision)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        x = normalise(batch.to(device), cfg.mean, cfg.std).contiguous(
            memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = model.embed(x)
            if flip:
                z = z + model.embed(x.flip(3))
        out.append(torch.nn.functional.normalize(z.float(), dim=1).cpu())
    return torch.cat(out).numpy()


def images_digest(images: np.ndarray) -> str:
    """A short content hash of an image array, so the cache key follows the data."""
    h = hashlib.sha1()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images[:: max(1, len(images) // 256)]).tobytes())
    return h.hexdigest()[:12]


def cached_embeddings(trained: TrainedModel, images: np.ndarray, name: str,
                      flip: bool = True, precision: str | None = None) -> np.ndarray:
    """Extract once per (model, images, flip); later calls read `<run>/embeddings/*.npy`."""
    path = Path(trained.run_dir) / "embeddings" / f"{name}-{images_digest(images)}-f{int(flip)}.npy"
    return cached(path, lambda: extract_embeddings(trained, images, flip=flip, precision=precision),
                  save_npy, np.load)
