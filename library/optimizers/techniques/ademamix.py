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

from . import ops

__all__ = ["alpha_at", "mix_list_"]


def alpha_at(alpha: float, t: int, warmup: int) -> float:
    if warmup <= 0:
        return alpha
    return alpha * min(1.0, t / warmup)


def mix_list_(outs, m1s, m2s, alpha: float) -> None:
    """``out = (m1 + alpha m2) / (1 + alpha)`` per tensor. The slow EMA itself is an EMA of fixed
    beta: ``momentum_decay.momentum_list_``."""
    ops.copy_(outs, m1s)
    if alpha == 0.0:
        return
    ops.add_(outs, m2s, alpha=alpha)
    ops.mul_(outs, 1.0 / (1.0 + alpha))
