"""What defines a fine-tuning task: an input transform (rotated, flipped, inverted, corrupted
digits) and a relabelling (parity, residue mod 3, digit ≥ 5, prime digit), either or both.

A transform maps a batch (B, C, H, W) or (B, L) to a batch of the same shape; a relabelling maps
class indices (B,) to the task's class indices, fewer than the base's, so the task's head (as
wide as the base's) leaves the rest unused.
They are deterministic so a task's data is the same in every stage that builds it: ``noise``
draws from a generator seeded by the batch's shape and content, so the same inputs always
get the same noise.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate90(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError("transform 'rotate90' needs image data (N, C, H, W)")
    return x.rot90(1, dims=(2, 3))


def rotate180(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError("transform 'rotate180' needs image data (N, C, H, W)")
    return x.rot90(2, dims=(2, 3))


def rotate270(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError("transform 'rotate270' needs image data (N, C, H, W)")
    return x.rot90(3, dims=(2, 3))


def hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


def vflip(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError("transform 'vflip' needs image data (N, C, H, W)")
    return x.flip(-2)


def invert(x: Tensor) -> Tensor:
    """Photographic negative within the data's own range."""
    lo, hi = x.amin(), x.amax()
    return hi + lo - x


def blur(x: Tensor) -> Tensor:
    """3×3 box blur (a corruption), edges padded by replication; 1-D data gets a 3-tap blur."""
    if x.dim() == 4:
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return F.avg_pool1d(F.pad(x.unsqueeze(1), (1, 1), mode="replicate"), 3, stride=1).squeeze(1)


def noise(x: Tensor) -> Tensor:
    """Additive Gaussian noise (a corruption), std 0.5 of the data's std, seeded by the data itself."""
    digest = hashlib.sha256(x.detach().contiguous().cpu().numpy().tobytes()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return x + 0.5 * x.std() * torch.randn(x.shape, generator=g, dtype=x.dtype)


def contrast(x: Tensor) -> Tensor:
    """Contrast reduced to 30% around the data's mean (a corruption)."""
    mean = x.mean()
    return mean + 0.3 * (x - mean)


def identity(x: Tensor) -> Tensor:
    return x


TRANSFORMS = {"identity": identity, "rotate90": rotate90, "rotate180": rotate180, "rotate270": rotate270, "hflip": hflip,
              "vflip": vflip, "invert": invert, "blur": blur, "noise": noise, "contrast": contrast}


def apply_transform(name: str, x: Tensor) -> Tensor:
    if name not in TRANSFORMS:
        raise ValueError(f"finetune.tasks: transform {name!r} is not one of {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name](x)


RELABELS = {
    "identity": lambda y: y,
    "parity": lambda y: y % 2,  # even / odd
    "mod3": lambda y: y % 3,
    "high": lambda y: (y >= 5).long(),  # digit ≥ 5
    "prime": lambda y: torch.isin(y, torch.tensor([2, 3, 5, 7])).long(),
}


def apply_relabel(name: str, y: Tensor) -> Tensor:
    if name not in RELABELS:
        raise ValueError(f"finetune.tasks: relabel {name!r} is not one of {', '.join(RELABELS)}")
    return RELABELS[name](y)


def task_data(transform: str, relabel: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """A task's (inputs, labels) made from the dataset's."""
    return apply_transform(transform, x), apply_relabel(relabel, y)
