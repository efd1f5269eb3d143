"""Hypergradient lr scale: one multiplicative step-size factor per tensor, adapted online.

Multiplicative hypergradient descent (Baydin et al., "Online learning rate adaptation with
hypergradient descent", ICLR 2018, the multiplicative rule), normalised and in log units.
With the previous update direction m_{t-1} (the momentum: the direction the tensor last moved
along, before the lr) and the gradient x_t entering the momentum now:

    c_t = cos(m_{t-1}, x_t)                      one scalar per tensor, in [-1, 1]
    h_t = clamp(h_{t-1} * exp(rate * c_t), lo, hi)       h_0 = 1
    the tensor's lr = group["lr"] * h_t          (times the lr mask, where one is on)

The derivative of the loss with respect to the log of the last step's lr is
-lr * <g_t, u_{t-1}>: where the new gradient still points the way the tensor moved (c > 0), a
larger step would have lowered the loss and h grows; where it points back (c < 0, the step
overshot) h shrinks; noise alone gives c near 0 and leaves h where it is. The cosine makes the
rule scale-free: ``rate`` is in log units per step, independent of the lr and of the gradient's
size, so a run started 10x too low or too high is pulled toward a working lr within tens of
steps. ``lo``/``hi`` bound h relative to the scheduled lr, so a group's lr, its schedule and a
LoRA+ ratio keep their meaning (at most ``hi`` times the scheduled lr).

The per-element lr mask (``lr_mask.py``) and this scale answer different questions: the mask
redistributes the lr between the elements of a tensor from per-element sign agreement (noisy:
one sign per element); this scale moves the whole tensor's lr from the agreement of the whole
tensor (one cosine over all its elements), which is what finds the lr's scale.
"""
from __future__ import annotations

import torch

from . import lr_mask, ops


def group_bounds(group: dict) -> tuple[float, float]:
    """The scale's range ``(lo, hi)`` for a param group: [``hypergrad_floor``,
    ``hypergrad_ceiling``], tightened so that scale x the lr mask's bound (where a mask is on)
    stays within the absolute ``min_lr`` / ``max_lr`` at the group's ``base_lr`` where they are
    set (the product, not each factor, is what they bound); always containing 1."""
    lo, hi = group["hypergrad_floor"], group["hypergrad_ceiling"]
    base = group["base_lr"]
    if base > 0:
        m_lo, m_hi = lr_mask.group_bounds(group) if group["use_lr_mask"] else (1.0, 1.0)
        if group["min_lr"] is not None:
            lo = max(lo, group["min_lr"] / (base * m_lo))
        if group["max_lr"] is not None:
            hi = min(hi, group["max_lr"] / (base * m_hi))
    return min(lo, 1.0), max(hi, 1.0)


def scale_list_(scales, cos: torch.Tensor, rate: float, lo: float, hi: float, ok=None) -> None:
    """``h <- clamp(h * exp(rate * c), lo, hi)`` for each 0-dim fp32 scale in ``scales``, with
    ``cos`` one fp32 vector (one cosine per tensor). ``ok`` (bool vector): where False the
    scale is left as it is (a skipped tensor)."""
    old = ops.values(scales)
    new = old * torch.exp(cos * rate)
    new.clamp_(lo, hi)
    if ok is not None:
        new = torch.where(ok, new, old)
    ops.set_values_(scales, new)
