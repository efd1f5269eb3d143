"""Multi-scale momentum: AdEMAMix's slow EMA (Pagliardini, Ablin, Grangier, arXiv 2409.03557).

AdEMAMix keeps a fast EMA m1 (b1) and a slow EMA m2 (b3 close to 1, no bias correction)
and steps along m1 + a * m2, with a warmed up linearly from 0 over T_a steps. Here:

    m2 <- b3 m2 + (1 - b3) x
    a_t = a * min(1, t / T_a)
    m_mix = (m1 + a_t m2) / (1 + a_t)

Deviations: the mix is normalised by (1 + a_t), so a consistent x gives the same step as m1
alone and the preset's learning rates keep their meaning; b3 is not warmed up (the paper's
half-life schedule matters for b3 = 0.9999 over long runs; adapter runs are short).
"""
from __future__ import annotations

import torch

__all__ = ["alpha_at", "update_slow_", "mix"]


def alpha_at(alpha: float, t: int, warmup: int) -> float:
    if warmup <= 0:
        return alpha
    return alpha * min(1.0, t / warmup)


def update_slow_(m2: torch.Tensor, x: torch.Tensor, beta: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``m2 <- beta m2 + (1 - beta) x`` (``keep``: as in momentum_decay.momentum_)."""
    return m2.mul_(beta if keep is None else keep).add_(x, alpha=1.0 - beta)


def mix(m1: torch.Tensor, m2: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (m1 + alpha m2) / (1 + alpha)``."""
    if alpha == 0.0:
        return out.copy_(m1)
    torch.add(m1, m2, alpha=alpha, out=out)
    return out.mul_(1.0 / (1.0 + alpha))
