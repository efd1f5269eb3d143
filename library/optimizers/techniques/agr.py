"""AGR, Adaptive Gradient Regularization (Jiang et al., arXiv 2407.16944).

    alpha_i = |g_i| / sum_j |g_j|        (per tensor, sum alpha = 1)
    g_i    <- g_i * (1 - alpha_i)

Guards: an all-zero gradient stays zero (no 0/0), and single-element tensors are left alone
(AGR would set their gradient to exactly zero and freeze them).
"""
from __future__ import annotations

import torch

TINY = 1e-30


def agr(g: torch.Tensor, out: torch.Tensor | None = None, tmp: torch.Tensor | None = None,
        total: torch.Tensor | None = None) -> torch.Tensor:
    """Return the AGR-regularised gradient (into ``out`` if given). ``g`` is not modified.

    ``total`` = sum |g| clamped to >= TINY, when the caller computed it already (for many
    tensors at once); otherwise it is computed here.
    """
    if g.numel() <= 1:
        return g if out is None else out.copy_(g)
    a = torch.abs(g, out=tmp) if tmp is not None else g.abs()
    if total is None:
        total = a.sum().clamp_min_(TINY)
    a.mul_(g).div_(total)  # alpha * g
    if out is None:
        return g - a
    return torch.sub(g, a, out=out)
