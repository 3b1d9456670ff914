"""Triton helpers shared by the kernels: torch's rounding, written so the interpreter runs it too.

Imports Triton at import time; only the ``triton_*`` kernel modules import it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """torch.round: nearest integer, ties to the even one (libdevice's ``rint`` does not run under
    the interpreter)."""
    f = tl.floor(x)
    frac = x - f  # exact, in [0, 1)
    odd = f - 2.0 * tl.floor(0.5 * f)  # 1.0 where f is odd, else 0.0
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac == 0.5, f + odd, f))
