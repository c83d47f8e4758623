"""Training-time augmentation on device tensors: the CIFAR standard crop + flip.

Paper recipes for ResNet-20 / VGG-16 train with random 32x32 crops of the image padded
by 4 pixels and random horizontal flips. Done here on the whole batch at once with
index arithmetic (no per-image Python loop, no torchvision), on the batch's device,
seeded by (seed, step) so a round that retrains from step k sees the same augmented
batches as the dense run did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip")
PAD = 4


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def crop_flip(images: torch.Tensor, seed: int, step: int, pad: int = PAD) -> torch.Tensor:
    """Random `pad`-pixel shifts (zero padding) and horizontal flips of (N, C, H, W) images."""
    n, channels, height, width = images.shape
    generator = _generator(seed, step)
    shift_y = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    shift_x = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = torch.arange(height, device=images.device)[None, :] + shift_y[:, None]
    cols = torch.arange(width, device=images.device)[None, :] + shift_x[:, None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def augment(images: torch.Tensor, kind: str, seed: int, step: int) -> torch.Tensor:
    """Apply the recipe's augmentation (`none` returns the batch itself)."""
    if kind == "none":
        return images
    if images.dim() != 4:
        raise ValueError(f"train.augment {kind!r} needs image batches (N, C, H, W), got shape {tuple(images.shape)}")
    return crop_flip(images, seed, step)
