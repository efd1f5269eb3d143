"""Adam moments and direction (Kingma & Ba; AdamW: Loshchilov & Hutter, arXiv 1711.05101).

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps),  step size lr / (1 - b1^t)

Written with the same operation order as ``torch.optim.AdamW`` so that, with every extra
feature off, the presets match it to float rounding.
"""
from __future__ import annotations

import math

from . import ops


def update_second_moment_list_(vs, gs, beta2: float, decay=None) -> None:
    """v <- b2 v + (1 - b2) g^2; ``decay`` (one 0-dim tensor per v) replaces b2 as the
    multiplier when given (1 keeps a skipped tensor's v unchanged, its g being zero)."""
    ops.mul_(vs, beta2 if decay is None else decay)
    ops.addcmul_(vs, gs, gs, value=1.0 - beta2)


def denominator_list_(dens, vs, step: int, beta2: float, eps: float) -> None:
    """``den = sqrt(v)/sqrt(1-b2^t) + eps`` into ``dens`` (same op order as torch's AdamW)."""
    ops.into_("sqrt", dens, vs)
    ops.div_(dens, math.sqrt(1.0 - beta2**step))
    ops.add_(dens, eps)


def quotient_list_(outs, nums, dens) -> None:
    """``out = num / den`` exactly (0 + num/den), into preallocated ``outs``."""
    ops.zero_(outs)
    ops.addcdiv_(outs, nums, dens)
