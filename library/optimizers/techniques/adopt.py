"""ADOPT (Taniguchi et al., NeurIPS 2024, arXiv 2411.02853), current clipped version.

k = number of completed steps before this one.
    k = 0:  v <- g^2, no parameter move, no weight decay.
    k > 0:  n = clip(g / max(sqrt(v_prev), eps), -k^(1/4), k^(1/4))
            m <- b1 m + (1 - b1) n ;  p <- p - lr m ;  v <- b2 v + (1 - b2) g^2
The normaliser is the *previous* second moment; there is no bias correction.
"""
from __future__ import annotations

from . import ops

def clip_value(k: int) -> float:
    return float(k) ** 0.25


# about sqrt(smallest normal fp32): keeps max(sqrt(v), eps) > 0 for eps = 0, so a zero v gives 0 / floor = 0
_FLOOR = 1.1e-19


def normalize_list_(outs, gs, vs, k: int, eps: float) -> None:
    """``out = clip(g / max(sqrt(v), eps), -k^(1/4), k^(1/4))``, the reference code's form
    (a square root and a division: on CPU faster than the reciprocal square root)."""
    c = clip_value(k)
    ops.into_("sqrt", outs, vs)
    ops.clamp_min_(outs, max(eps, _FLOOR))
    ops.divide_into_(outs, gs)
    ops.clamp_(outs, -c, c)


def update_second_moment_list_(vs, gs, k: int, beta2: float, decay=None) -> None:
    """See ``adam.update_second_moment_list_`` for ``decay``."""
    if k == 0:
        ops.product_(vs, gs, gs)
    else:
        ops.mul_(vs, beta2 if decay is None else decay)
        ops.addcmul_(vs, gs, gs, value=1.0 - beta2)
