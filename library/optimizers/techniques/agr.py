"""AGR, Adaptive Gradient Regularization (Jiang et al., arXiv 2407.16944).

    alpha_i = |g_i| / sum_j |g_j|        (per tensor, sum alpha = 1)
    g_i    <- g_i * (1 - alpha_i)

Guards: an all-zero gradient stays zero (no 0/0), and single-element tensors are left alone
(AGR would set their gradient to exactly zero and freeze them).
"""
from __future__ import annotations

import torch

from . import ops

TINY = 1e-30


def agr_list_(outs, gs, tmps=None, weights=None) -> None:
    """outs <- w g (1 - |g| / sum|g|) per tensor, w = 1 or the matching 0-dim tensor of
    ``weights`` (0 zeroes a skipped tensor in the same pass). ``outs`` may be ``gs`` (then
    ``tmps`` is scratch). Callers leave single-element tensors out (AGR would zero them)."""
    w = tmps if outs is gs else outs
    ops.into_("abs", w, gs)
    totals = ops.sums(w).clamp_min_(TINY)
    if weights is None:
        ops.per_tensor_("div_", w, totals.neg_())
        ops.add_(w, 1.0)
    else:
        wv = torch.stack(weights)
        ops.per_tensor_("mul_", w, -wv / totals)
        ops.per_tensor_("add_", w, wv)
    ops.mul_(outs, w if outs is gs else gs)
