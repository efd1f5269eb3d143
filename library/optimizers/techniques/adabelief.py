"""AdaBelief residual (Zhuang et al., NeurIPS 2020, arXiv 2010.07468), the "belief" second moment.

AdaBelief replaces Adam's EMA of g^2 by an EMA of the squared deviation of the observation
from its prediction (the momentum):

    s <- b s + (1 - b) ((x - m)^2 + eps)          (m already updated with x)
    direction = m / sqrt(s / (1 - b^t))

Used here on the CAME-normalised gradient x = u: it is CAME's instability U (section 1)
kept elementwise instead of factored, which is what the Automagic presets use for 0-D/1-D
tensors (official CAME gives those no confidence at all). Deviation from the paper: eps is
added inside the squared residual (floor eps, as CAME does) rather than to s after the
update (floor eps / (1 - b)); the residual is of the normalised gradient, not the raw one.
"""
from __future__ import annotations

import torch

__all__ = ["residual", "update_residual_", "direction"]


def residual(x: torch.Tensor, m: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (x - m)^2 + eps``."""
    return torch.sub(x, m, out=out).square_().add_(eps)


def update_residual_(s: torch.Tensor, res: torch.Tensor, beta: float) -> torch.Tensor:
    """``s <- b s + (1 - b) res`` with ``res`` from :func:`residual`."""
    return s.mul_(beta).add_(res, alpha=1.0 - beta)


def direction(m: torch.Tensor, s: torch.Tensor, bc: float, out: torch.Tensor) -> torch.Tensor:
    """``out = m * rsqrt(s) * bc`` with ``bc = sqrt(1 - b^t)`` (1.0 for no bias correction)."""
    torch.rsqrt(s, out=out).mul_(m)
    if bc != 1.0:
        out.mul_(bc)
    return out
