"""Cautious optimizers (Liang et al., arXiv 2411.16085).

    phi = 1[u * g > 0];   u' = u * phi / max(mean(phi), 1e-3)

The mean-normalised variant (as in the authors' current code and timm): when every
coordinate agrees the step equals the base optimizer's exactly. Weight decay is not masked.
"""
from __future__ import annotations

import torch

FLOOR = 1e-3


def cautious_(u: torch.Tensor, g: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Apply the cautious mask to ``u`` in place (``tmp`` is scratch of u's shape)."""
    torch.mul(u, g, out=tmp)
    tmp.gt_(0)
    scale = tmp.mean().clamp_min_(FLOOR)
    return u.mul_(tmp).div_(scale)
