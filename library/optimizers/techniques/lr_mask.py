"""Per-element learning-rate mask (Automagic, ostris/ai-toolkit), made scheduler-aware.

The mask is kept as a *scale* s relative to the group's base lr (the lr at construction),
so the effective per-element lr is ``group['lr'] * s`` and follows any lr scheduler:
    s_0 = 1
    s   <- clamp(s + b * sign(m_prev * m_new), min_lr / base_lr, max_lr / base_lr)
with b = lr_bump / base_lr during ``warmup_steps`` and ``post_warmup_ratio * b`` after it
("gentle after warmup"). sign(m_prev * m_new) is +1 where consecutive update directions agree,
-1 where they flip, and 0 where there is no previous direction, so the first step does not
bump anything (no step-1 polarity artefact). The update direction's sign is the momentum's
sign because the Adam/ADOPT denominator is positive: no polarity state is stored.
"""
from __future__ import annotations

import torch


def bump_list_(masks, agree, bump: float, lo: float, hi: float, weights=None) -> None:
    """``mask += bump * agree`` then clamp; ``agree`` holds -1/0/+1 (fp32); ``weights`` (one
    0-dim tensor per mask, 0 or 1) switches the bump off for skipped tensors."""
    if weights is None:
        torch._foreach_add_(masks, agree, alpha=bump)
    else:
        torch._foreach_addcmul_(masks, agree, weights, value=bump)
    for m in masks:
        m.clamp_(lo, hi)


def bump_(mask: torch.Tensor, agree: torch.Tensor, bump: float, lo: float, hi: float) -> None:
    bump_list_([mask], [agree], bump, lo, hi)


def storage_dtype(lr_bump: float, base_lr: float, min_lr: float, max_lr: float) -> torch.dtype:
    """fp16 (2 bytes) when it is lossless enough, else fp32.

    fp16 is used when every scale in [min_lr, max_lr] / base_lr is a normal fp16 number and a
    bump is at least one fp16 ulp at the largest scale, so round-to-nearest can never stall
    the mask; otherwise the mask is kept in fp32.
    """
    import math

    if base_lr <= 0 or lr_bump <= 0:
        return torch.float32
    lo, hi = min_lr / base_lr, max_lr / base_lr
    if hi > 6.0e4 or lo < torch.finfo(torch.float16).tiny:
        return torch.float32
    _, exp = math.frexp(max(hi, 1.0))  # hi < 2**exp
    ulp = 2.0 ** (exp - 1 - 10)  # fp16 has 10 explicit mantissa bits
    return torch.float16 if lr_bump / base_lr >= ulp else torch.float32
