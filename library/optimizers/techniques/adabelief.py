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

from . import ops

__all__ = ["residual_list_", "update_residual_list_", "direction_list_"]


def residual_list_(outs, xs, ms, eps: float) -> None:
    """``out = (x - m)^2 + eps`` per tensor."""
    ops.into_("sub", outs, xs, ms)
    ops.pow_(outs, 2.0)
    ops.add_(outs, eps)


def update_residual_list_(ss, res, beta: float) -> None:
    """``s <- b s + (1 - b) res`` with ``res`` from :func:`residual_list_`."""
    ops.mul_(ss, beta)
    ops.add_(ss, res, alpha=1.0 - beta)


def direction_list_(outs, ms, ss, bc: float) -> None:
    """``out = m * rsqrt(s) * bc`` with ``bc = sqrt(1 - b^t)`` (1.0 for no bias correction)."""
    ops.into_("rsqrt", outs, ss)
    ops.mul_(outs, ms)
    if bc != 1.0:
        ops.mul_(outs, bc)
