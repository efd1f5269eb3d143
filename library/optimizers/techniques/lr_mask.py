"""Per-element learning-rate mask: multiplicative, scale-free step-size adaptation.

The lineage is Automagic's lr mask (ostris/ai-toolkit: an absolute per-element lr moved by
``+-lr_bump`` where consecutive update directions agree / disagree) and, further back, Jacobs'
delta-bar-delta and Rprop. Here the mask is a *scale* s of the group's *scheduled* lr, moved
multiplicatively, so it means the same thing at any lr and under any scheduler:

    a_t = sign(g_t * m_{t-1})             +1 where the new gradient agrees with the momentum
                                          (the direction the last updates took), -1 where it
                                          opposes it, 0 where there is no momentum yet (step 1)
    s_t = clamp(s_{t-1} * exp(r a_t), lo, hi)      s_0 = 1
    per-element lr = group["lr"] * s_t

``a_t`` is the sign of the hypergradient of the loss with respect to the element's log-lr
(Baydin et al., "Online learning rate adaptation with hypergradient descent", 2018): where
the gradient keeps pointing the way the parameter has been moving, a larger step would have
helped; where it flips, the step overshot. ``r`` (``lr_mask_rate``) is a rate in log units
per step, so it does not depend on the lr's scale.

Bounds are relative to the lr the group was built with (``base_lr``): ``[floor, ceiling]``
(``lr_mask_floor`` / ``lr_mask_ceiling``), tightened by the optional absolute ``min_lr`` /
``max_lr`` (``min_lr / base_lr``, ``max_lr / base_lr``), and always containing 1, so a mask
never starts outside its range and a group lr outside ``[min_lr, max_lr]`` is not an error.
A group given a lower lr (a text encoder, a LoRA+ split) therefore never steps with more than
``ceiling`` times its scheduled lr.
"""
from __future__ import annotations

import math

import torch

from . import ops


def bounds(base_lr: float, floor: float, ceiling: float, min_lr: float | None = None,
           max_lr: float | None = None) -> tuple[float, float]:
    """The mask's range ``(lo, hi)`` with ``lo <= 1 <= hi``: see the module docstring."""
    lo, hi = floor, ceiling
    if base_lr > 0:
        if min_lr is not None:
            lo = max(lo, min_lr / base_lr)
        if max_lr is not None:
            hi = min(hi, max_lr / base_lr)
    return min(lo, 1.0), max(hi, 1.0)


def group_bounds(group: dict) -> tuple[float, float]:
    """:func:`bounds` of a param group (its ``base_lr``, ``lr_mask_floor``, ``lr_mask_ceiling``,
    ``min_lr``, ``max_lr``), the form both optimizer families store them in."""
    return bounds(group["base_lr"], group["lr_mask_floor"], group["lr_mask_ceiling"], group["min_lr"], group["max_lr"])


def lattice(lo: float, hi: float, r: float, bits: int = 8) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Log-codec levels on which a mask moving at rate ``r`` never needs rounding, or None.

    A mask starts at 1 and is only ever multiplied by ``e^r`` or ``e^-r`` and clamped, so the
    values it can take are the points ``e^(k r)``. Where those inside ``[lo, hi]`` fit in the
    codec's ``2^bits`` levels, returns ``((codec_lo, codec_hi), (clamp_lo, clamp_hi))``: the
    codec's range, whose levels are exactly ``r`` apart in log with 1 on a level, and the bounds
    to clamp to, the outermost points inside ``[lo, hi]`` (a clamp to ``lo`` or ``hi`` themselves
    would leave the lattice). A mask kept this way is stored without loss: each code it writes is
    the exact level (up to fp32 rounding, ~1e-7 relative, against levels 2 % apart at the default
    rate). Returns None where ``r <= 0`` or the points do not fit (a rate below
    ``ln(hi / lo) / (2^bits - 1)``, 0.018 for [0.1, 10] at 8 bits); the codec then rounds
    stochastically between its levels.
    """
    if r <= 0 or lo <= 0:
        return None
    levels = (1 << bits) - 1
    below = math.floor(math.log(1.0 / lo) / r + 1e-9)  # points e^(-k r) >= lo, k = 1..below
    above = math.floor(math.log(hi) / r + 1e-9)
    top = (levels - below) * r  # log of the codec's top level
    if below + above > levels or top > 80.0:  # e^80 ~ 5.5e34: the codec's fp32 levels stay finite
        return None
    return (math.exp(-below * r), math.exp(top)), (math.exp(-below * r), math.exp(above * r))


def rate(lr_mask_rate: float, lr_bump: float | None, base_lr: float) -> float:
    """The rate r in log units per step. ``lr_bump`` (the older absolute bump, an lr change
    per step) is read at the group's lr: r = lr_bump / base_lr; otherwise ``lr_mask_rate``."""
    if lr_bump is None:
        return lr_mask_rate
    return lr_bump / base_lr if base_lr > 0 else 0.0


def agreement_list_(outs, grads, moms) -> None:
    """``outs <- sign(g * m_prev)`` per tensor (call before the momentum update)."""
    ops.product_(outs, grads, moms)
    ops.sign_(outs)


def agreement_from_products_(products):
    """The agreement from the products ``g * m_prev`` already formed (another technique needed
    them too): their signs, in place; returns ``products``."""
    ops.sign_(products)
    return products


def scale_list_(masks, agree, r: float, lo: float, hi: float) -> None:
    """``s <- clamp(s * exp(r a), lo, hi)``; ``agree`` (fp32, -1/0/+1) is consumed as scratch. A
    skipped tensor's mask stays as it is because its agreement is 0 (both optimizer families
    zero its gradient before the product).

    ``exp(r a)`` takes three values, so for a rate given to :func:`prepare` it is formed without an
    exponential pass: ``f = max(1 + c a, e^-r)`` with ``c = e^r - 1``, the same bits.
    """
    factors = _FACTORS.get((r, agree[0].device.type))
    if factors is None:
        ops.mul_(agree, r)
        ops.exp_(agree)
    else:
        ops.affine_(agree, factors[0], 1.0)  # 1 + c a
        ops.clamp_min_(agree, factors[1])
    ops.mul_(masks, agree)
    ops.clamp_(masks, lo, hi)


_FACTORS: dict = {}  # (rate, device type) -> (e^r - 1, e^-r), or None: only the exponential has its bits


def prepare(rates, devices) -> None:
    """Work out :func:`scale_list_`'s exp-free factors for these rates on these devices now (it
    reads a few values back to the host): optimizers call this where a param group is set up or
    loaded, so that step() never does. Each device type gets the bits of its own ``exp`` (a GPU's
    may differ from the CPU's in the last place). A rate not prepared is applied with the
    exponential: same bits, one more pass."""
    for device in {torch.device(d).type for d in devices}:
        for r in rates:
            if r > 0 and (r, device) not in _FACTORS:
                _FACTORS[(r, device)] = _step_factors(r, device)


def _step_factors(r: float, device="cpu"):
    """``(c, e^-r)`` with ``c = e^r - 1``, both as fp32 values of torch's own ``exp`` of
    ``+-fl32(r)`` on ``device`` (the values ``exp(r a)`` takes for a = +1, -1), or None where the
    exp-free form would not give exactly those bits.

    For a = 1: ``1 + c`` is e^r exactly (c is e^r - 1 with no rounding, e^r being an fp32 number
    >= 1); a = 0 (or -0): 1; a = -1: ``1 - c`` = 2 - e^r, which lies below e^-r (e^r + e^-r > 2),
    so ``max(., e^-r)`` gives e^-r. Where rounding breaks one of these (a tiny r, whose e^r and
    e^-r are next to 1), the check below fails and the mask keeps the exponential."""
    up, down = torch.exp(torch.tensor([r, -r], dtype=torch.float32, device=device)).tolist()
    a = torch.tensor([1.0, -1.0, 0.0, -0.0], device=device)
    c = up - 1.0
    cheap = (a * c + 1.0).clamp_min_(down)
    exact = float(torch.tensor(c, dtype=torch.float32)) == c and torch.equal(cheap, torch.exp(a * r))
    return (c, down) if exact else None


_FP16_REL_ULP = 2.0 ** -10  # relative spacing of fp16 numbers, at most


def storage_dtype(r: float, lo: float, hi: float) -> torch.dtype:
    """fp16 (2 bytes) when it is lossless enough, else fp32.

    fp16 is used when every scale in ``[lo, hi]`` is a normal fp16 number and one step
    ``exp(r)`` moves a scale by at least one fp16 spacing, so round-to-nearest never stalls
    the mask; otherwise the mask is kept in fp32.
    """
    if r <= 0 or hi > 6.0e4 or lo < torch.finfo(torch.float16).tiny:
        return torch.float32
    return torch.float16 if -math.expm1(-r) >= _FP16_REL_ULP else torch.float32
