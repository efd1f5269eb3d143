"""Grams, Gradient Descent with Adaptive Momentum Scaling (Cao et al., arXiv 2412.17107).

    u' = sign(g) * |u|

The step keeps the adaptive (momentum) magnitude but always points along the current
gradient. sign(0) = 0: coordinates with an exactly zero gradient do not move.
"""
from __future__ import annotations

import torch


def grams_(u: torch.Tensor, g: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    torch.sign(g, out=tmp)
    return u.abs_().mul_(tmp)


def grams_cautious_(u: torch.Tensor, g: torch.Tensor, tmp: torch.Tensor, tmp2: torch.Tensor) -> torch.Tensor:
    """Both switched on: the average of the two rules, in place on ``u``.

        u' = 0.5 * sign(g)|u| + 0.5 * u * phi / max(mean(phi), 1e-3),   phi = 1[u g > 0]

    Where the momentum agrees with the gradient the step is (1 + 1/mean(phi))/2 of the base
    step; where it disagrees the coordinate moves along the gradient at half the base
    magnitude (Grams flips it, Cautious would stop it). Neither rule is a no-op.
    """
    from .cautious import FLOOR

    torch.mul(u, g, out=tmp)
    tmp.gt_(0)  # phi
    scale = tmp.mean().clamp_min_(FLOOR)
    torch.sign(g, out=tmp2)
    tmp2.mul_(u.abs())  # sign(g)|u|   (one temporary: |u|)
    u.mul_(tmp).div_(scale)  # cautious
    return u.add_(tmp2).mul_(0.5)
