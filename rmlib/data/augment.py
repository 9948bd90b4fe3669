"""Augmentation on batched uint8 tensors: one gather per batch instead of per-image PIL calls.

Explained in the book: book/models.
"""

from __future__ import annotations

import torch


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator,
                     flip: torch.Tensor | None = None) -> torch.Tensor:
    """Random crops of the padded batch (zero padding) and horizontal flips: random ones,
    or those `flip` (B,) marks.

    images: (B, C, H, W), any dtype; returns the same shape and dtype.
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    if flip is None:
        flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b)[:, None, None]
    # advanced indexing: (B, H, W, C) -> back to (B, C, H, W)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_erase(images: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                 area: tuple[float, float] = (0.02, 0.4)) -> torch.Tensor:
    """Random erasing (Zhong et al.) on a float batch: a random rectangle set to noise."""
    b, c, h, w = images.shape
    out = images.clone()
    chosen = torch.rand(b, generator=generator) < p
    frac = area[0] + (area[1] - area[0]) * torch.rand(b, generator=generator)
    aspect = torch.exp((torch.rand(b, generator=generator) - 0.5) * 2 * 1.2)  # ~[0.3, 3.3]
    eh = (torch.sqrt(frac * h * w * aspect)).long().clamp(1, h)
    ew = (torch.sqrt(frac * h * w / aspect)).long().clamp(1, w)
    y0 = (torch.rand(b, generator=generator) * (h - eh + 1).float()).long()
    x0 = (torch.rand(b, generator=generator) * (w - ew + 1).float()).long()
    ys = torch.arange(h)[None, :]
    xs = torch.arange(w)[None, :]
    mask = ((ys >= y0[:, None]) & (ys < (y0 + eh)[:, None]))[:, :, None] & \
           ((xs >= x0[:, None]) & (xs < (x0 + ew)[:, None]))[:, None, :]
    mask &= chosen[:, None, None]
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return torch.where(mask[:, None], noise, out)
