"""ADOPT (Taniguchi et al., NeurIPS 2024, arXiv 2411.02853), current clipped version.

k = number of completed steps before this one.
    k = 0:  v <- g^2, no parameter move, no weight decay.
    k > 0:  n = clip(g / max(sqrt(v_prev), eps), -k^(1/4), k^(1/4))
            m <- b1 m + (1 - b1) n ;  p <- p - lr m ;  v <- b2 v + (1 - b2) g^2
The normaliser is the *previous* second moment; there is no bias correction.
"""
from __future__ import annotations

import torch


def clip_value(k: int) -> float:
    return float(k) ** 0.25


def normalize(g: torch.Tensor, v: torch.Tensor, k: int, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``out = clip(g / max(sqrt(v), eps), -k^(1/4), k^(1/4))`` (all zeros at k = 0)."""
    c = clip_value(k)
    torch.sqrt(v, out=out)
    out.clamp_min_(eps)
    torch.div(g, out, out=out)
    return out.clamp_(-c, c)


def update_second_moment_(v: torch.Tensor, g: torch.Tensor, k: int, beta2: float) -> None:
    if k == 0:
        torch.mul(g, g, out=v)
    else:
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
