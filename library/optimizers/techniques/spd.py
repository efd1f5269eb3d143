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


from . import ops
from .orthograd import dots

EPS = 1e-12


def _deviations(ps, anchors, tmps):
    if anchors is None:
        return ps
    ops.into_("sub", tmps, ps, anchors)
    return tmps


def pre_step_list(ps, gs, anchors, tmps, scratch=None):
    """Before the step: (moving_away, ||theta - theta0||) as vectors over the fp32 tensors
    ``ps``; ``anchors`` None means anchor zero; ``scratch``: see :func:`~.orthograd.dots`."""
    devs = _deviations(ps, anchors, tmps)
    moving_away = dots(gs, devs, scratch) > 0  # c = -<g, theta - theta0> < 0
    return moving_away, ops.norms(devs)


def project_list_(ps, anchors, moving_away, old_norms, lam: float, tmps) -> None:
    """Apply the selective projection to the proposals ``ps`` (fp32) in place."""
    devs = _deviations(ps, anchors, tmps)
    new_norms = ops.norms(devs)
    r = ((new_norms - old_norms) / new_norms.clamp_min(EPS)).clamp_(0.0, 1.0)
    s = r * moving_away.to(r.dtype) * lam
    if anchors is None:
        ops.mul_(ps, 1.0 - s)
    else:
        ops.addcmul_(ps, devs, s, value=-1.0)


def spd_reference(theta, theta_new, g, anchor, lam):
    """Plain restatement of the rule on whole tensors (for tests)."""
    c = -(g * (theta - anchor)).sum()
    if c >= 0:
        return theta_new.clone()
    n_new = (theta_new - anchor).norm()
    n_old = (theta - anchor).norm()
    r = ((n_new - n_old) / n_new).clamp(0, 1)
    return theta_new - lam * r * (theta_new - anchor)
