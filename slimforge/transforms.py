"""Input transforms that define the fine-tuning tasks (rotated, flipped, inverted digits).

Each maps a batch (B, C, H, W) or (B, L) to a batch of the same shape; labels stay.
They are deterministic so a task's data is the same in every stage that builds it.
"""

from __future__ import annotations

from torch import Tensor


def rotate90(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError("transform 'rotate90' needs image data (N, C, H, W)")
    return x.rot90(1, dims=(2, 3))


def rotate180(x: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError("transform 'rotate180' needs image data (N, C, H, W)")
    return x.rot90(2, dims=(2, 3))


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


TRANSFORMS = {"rotate90": rotate90, "rotate180": rotate180, "hflip": hflip, "vflip": vflip, "invert": invert}


def apply_transform(name: str, x: Tensor) -> Tensor:
    if name not in TRANSFORMS:
        raise ValueError(f"finetune.tasks: transform {name!r} is not one of {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name](x)
