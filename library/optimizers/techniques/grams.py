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
    Computed as u * (0.5 s + 0.5 phi / mean(phi)) with s = sign(u g) (sign(g)|u| = s u).
    """
    from .cautious import FLOOR

    s = torch.mul(u, g, out=tmp).sign_()
    phi = torch.clamp(s, min=0.0, out=tmp2)
    twice_mean = phi.mean().clamp_min_(FLOOR).mul_(2.0)
    coef = phi.div_(twice_mean).add_(s, alpha=0.5)
    return u.mul_(coef)
