"""TAM, Torque-Aware Momentum (Malviya et al., arXiv 2412.18790), adapted to Adam/ADOPT.

    S_t  = cos(m_{t-1}, x_t)                 (one scalar per tensor, fp32)
    s_t  = gamma s_{t-1} + (1 - gamma) S_t   (gamma = tam_beta)
    s^_t = s_t / (1 - gamma^c)               (bias correction, c = number of cosines so far)
    d_t  = (1 + s^_t) / 2  in [0, 1]
    m_t  = b1 m_{t-1} + (1 - b1) d_t x_t     (x = the gradient entering the momentum)

The damping acts on the gradient that enters the momentum, as in the paper (not on the
final update). The first step has no previous momentum: d = 1 there.
"""
from __future__ import annotations

import torch

from . import ops
from .orthograd import dots

EPS = 1e-30


def cosines(as_, bs, a_norms=None, products=None) -> torch.Tensor:
    """cos(a_i, b_i) as one fp32 vector; ``a_norms`` when already known; ``products``: the
    elementwise products a_i b_i when already formed (the dots are then their sums)."""
    a_norms = ops.norms(as_) if a_norms is None else torch.stack(a_norms).float()
    denom = (a_norms * ops.norms(bs)).clamp_min_(EPS)
    return (dots(as_, bs) if products is None else ops.sums(products)).div_(denom)


def damping_list(ss, cos: torch.Tensor, count: int, gamma: float, ok=None) -> torch.Tensor:
    """Update each smoothed cosine in ``ss`` (0-dim tensors) in place; return the d vector.
    ``ok`` (bool vector): where False the smoothed cosine is left unchanged."""
    old = ops.values(ss)
    s = old.mul(gamma).add_(cos, alpha=1.0 - gamma)
    if ok is not None:
        s = torch.where(ok, s, old)
    ops.set_values_(ss, s)
    return s.mul_(0.5 / (1.0 - gamma**count)).add_(0.5)


def momentum_list_(ms, xs, d: torch.Tensor, beta1: float, decay=None) -> None:
    """m <- b1 m + (1 - b1) d x, with ``d`` one value per tensor (``decay``: as in
    ``adam.update_second_moment_list_``)."""
    ops.mul_(ms, beta1 if decay is None else decay)
    ops.addcmul_(ms, xs, d, value=1.0 - beta1)
