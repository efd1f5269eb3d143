"""Adam moments and direction (Kingma & Ba; AdamW: Loshchilov & Hutter, arXiv 1711.05101).

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps),  step size lr / (1 - b1^t)

Written with the same operation order as ``torch.optim.AdamW`` so that, with every extra
feature off, the presets match it to float rounding.
"""
from __future__ import annotations

import math

import torch


def update_second_moment_(v: torch.Tensor, g: torch.Tensor, beta2: float) -> None:
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)


def direction(m: torch.Tensor, v: torch.Tensor, step: int, beta2: float, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``out = m / (sqrt(v)/sqrt(1-b2^t) + eps)``; the caller scales by lr / (1 - b1^t)."""
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    torch.sqrt(v, out=out)
    out.div_(bc2_sqrt).add_(eps)
    return torch.div(m, out, out=out)
