"""Grams, Gradient Descent with Adaptive Momentum Scaling (Cao et al., arXiv 2412.17107).

    u' = sign(g) * |u|

The step keeps the adaptive (momentum) magnitude but always points along the current
gradient. sign(0) = 0: coordinates with an exactly zero gradient do not move.
"""
from __future__ import annotations

import torch

from . import ops


def _signs_(outs, us, gs) -> None:
    """outs <- sign(u g)."""
    ops.product_(outs, us, gs)
    ops.sign_(outs)


def grams_list_(outs, us, gs, tmps=None) -> None:
    """outs <- sign(g) |u| (= u sign(u g)); ``outs`` may be ``us`` (then ``tmps`` is scratch)."""
    w = tmps if outs is us else outs
    _signs_(w, us, gs)
    ops.mul_(outs, w if outs is us else us)


def grams_cautious_list_(outs, us, gs, tmps=None) -> None:
    """Both switched on: the average of the two rules, outs <- u * coef per tensor:

        u' = 0.5 * sign(g)|u| + 0.5 * u * phi / max(mean(phi), 1e-3),   phi = 1[u g > 0]

    Where the momentum agrees with the gradient the step is (1 + 1/mean(phi))/2 of the base
    step; where it disagrees the coordinate moves along the gradient at half the base
    magnitude (Grams flips it, Cautious would stop it). Neither rule is a no-op.
    With s = sign(u g) (so sign(g)|u| = s u) the coefficient is 0.5 s + phi / (2 mean), which
    is A s for s >= 0 and -0.5 for s = -1, with A = 0.5 + 1 / (2 mean) >= 1: computed as
    max(A s, -0.5). mean(phi) = (sum s + sum s^2) / (2 n). ``outs`` may be ``us`` (then
    ``tmps`` is scratch).
    """
    from .cautious import FLOOR

    w = tmps if outs is us else outs
    _signs_(w, us, gs)  # s
    counts = [x.sum(dtype=torch.float32) for x in w]
    nonzero = torch._foreach_norm(w)  # s in {-1, 0, 1}: ||s||^2 counts the nonzero entries
    ops.mul_(nonzero, nonzero)
    ops.add_(counts, nonzero)
    ops.mul_(counts, [0.5 / max(x.numel(), 1) for x in w])  # mean(phi)
    a = torch.stack(counts).clamp_min_(FLOOR).reciprocal_().mul_(0.5).add_(0.5)
    ops.per_tensor_("mul_", w, a)
    ops.clamp_min_(w, -0.5)
    ops.mul_(outs, us if outs is not us else w)
