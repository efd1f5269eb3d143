"""SPD, Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024, arXiv 2411.01713).

With anchor theta0, pre-step theta, proposal theta~ and raw gradient g (per tensor):
    c = -<g, theta - theta0>
    if c < 0:  r = clamp((||theta~ - theta0|| - ||theta - theta0||) / ||theta~ - theta0||, 0, 1)
               theta_new = theta~ - lambda * r * (theta~ - theta0)
    else:      theta_new = theta~
Anchor zero for adapter weights (the paper's PEFT mode, no memory). Guard: a zero deviation
norm gives r = 0, never NaN. Reductions in fp32. Branch-free: the condition is a 0-dim tensor.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def pre_step(p: torch.Tensor, g: torch.Tensor, anchor: torch.Tensor | None, tmp: torch.Tensor):
    """Return ``(moving_away, ||theta - theta0||)`` as 0-dim tensors, before the step."""
    if anchor is None:
        dev = p if p.dtype == torch.float32 else tmp.copy_(p)
    else:
        dev = torch.sub(p, anchor, out=tmp)
    dev_f = dev.reshape(-1)
    g_f = g.reshape(-1)
    if g_f.dtype != torch.float32:
        g_f = g_f.float()
    moving_away = torch.dot(g_f, dev_f) > 0  # c < 0
    return moving_away, torch.linalg.vector_norm(dev_f)


def dot_raw(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """<g, theta> for anchor zero (the sign decides the projection; batched callers)."""
    g_f = g.reshape(-1)
    if g_f.dtype != torch.float32:
        g_f = g_f.float()
    return torch.dot(g_f, p.reshape(-1))


def project_(p: torch.Tensor, anchor: torch.Tensor | None, moving_away, old_norm, lam: float, tmp: torch.Tensor) -> None:
    """Apply the selective projection to the proposal ``p`` (fp32) in place."""
    if anchor is None:
        new_norm = torch.linalg.vector_norm(p.reshape(-1))
    else:
        dev = torch.sub(p, anchor, out=tmp)
        new_norm = torch.linalg.vector_norm(dev.reshape(-1))
    r = ((new_norm - old_norm) / new_norm.clamp_min(EPS)).clamp_(0.0, 1.0)
    s = r * moving_away.to(r.dtype) * lam
    if anchor is None:
        p.mul_(1.0 - s)
    else:
        p.sub_(tmp.mul_(s))


def spd_reference(theta, theta_new, g, anchor, lam):
    """Plain restatement of the rule on whole tensors (for tests)."""
    c = -(g * (theta - anchor)).sum()
    if c >= 0:
        return theta_new.clone()
    n_new = (theta_new - anchor).norm()
    n_old = (theta - anchor).norm()
    r = ((n_new - n_old) / n_new).clamp(0, 1)
    return theta_new - lam * r * (theta_new - anchor)
