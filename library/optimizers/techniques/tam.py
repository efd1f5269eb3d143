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

EPS = 1e-30


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    af, bf = a.reshape(-1), b.reshape(-1)
    denom = torch.linalg.vector_norm(af) * torch.linalg.vector_norm(bf)
    return torch.dot(af, bf) / denom.clamp_min(EPS)


def cosine_with_norm(a: torch.Tensor, b: torch.Tensor, a_norm: torch.Tensor) -> torch.Tensor:
    """cos(a, b) when ||a|| is already known (computed for many tensors at once)."""
    af, bf = a.reshape(-1), b.reshape(-1)
    denom = torch.linalg.vector_norm(bf).mul_(a_norm).clamp_min_(EPS)
    return torch.dot(af, bf).div_(denom)


def damping(s: torch.Tensor, cos: torch.Tensor, count: int, gamma: float) -> torch.Tensor:
    """Update the smoothed cosine ``s`` in place (``count`` cosines including this one); return d."""
    s.mul_(gamma).add_(cos, alpha=1.0 - gamma)
    return s.mul(0.5 / (1.0 - gamma**count)).add_(0.5)


def momentum_(m: torch.Tensor, x: torch.Tensor, d: torch.Tensor, beta1: float) -> None:
    """m <- b1 m + (1 - b1) d x, with ``d`` a 0-dim tensor."""
    m.mul_(beta1).addcmul_(x, d, value=1.0 - beta1)
