"""AdaDecay, adaptive weight decay (Nakamura & Hong, IEEE Access 2019, arXiv 1907.08931).

The decay rate of each parameter grows with the magnitude of its gradient, normalised
within its layer (here: within the tensor), through a sigmoid:

    z_i      = (|g_i| - mean(|g|)) / std(|g|)        (per tensor; population std)
    theta_i  = 2 * sigmoid(alpha * z_i)              in (0, 2); 1 for an average element
    p_i     <- p_i * (1 - lr_i * wd * theta_i)       (decoupled, per-element lr)

Guards: a tensor whose |g| is uniform (std = 0, including single-element tensors and an
all-zero gradient) gets theta = 1 everywhere (plain decoupled decay), never NaN.
The Automagic_CameAMP lineage used one z per tensor (its mean |g| standardised over the
whole group) and only during the first warmup/2 steps; this is the paper's per-element
form, applied at every step.
"""
from __future__ import annotations

import torch

__all__ = ["factor"]

TINY = 1e-30


def factor(g: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """``out = 2 * sigmoid(alpha * z)`` with z the standardised |g| of this tensor."""
    a = torch.abs(g, out=out)
    std, mean = torch.std_mean(a, correction=0)
    scale = torch.where(std > 1e-12 * mean.abs().clamp_min(TINY), alpha / std.clamp_min(TINY), torch.zeros_like(std))
    a.sub_(mean).mul_(scale)
    return a.sigmoid_().mul_(2.0)
