"""Cautious optimizers (Liang et al., arXiv 2411.16085).

    phi = 1[u * g > 0];   u' = u * phi / max(mean(phi), 1e-3)

The mean-normalised variant (as in the authors' current code and timm): when every
coordinate agrees the step equals the base optimizer's exactly. Weight decay is not masked.
"""
from __future__ import annotations

import torch

from . import ops

FLOOR = 1e-3


def agreement_list_(phis, us, gs) -> torch.Tensor:
    """phi = 1[u g > 0] into ``phis``; return max(mean(phi), FLOOR) per tensor as a vector."""
    ops.product_(phis, us, gs)
    ops.positive_(phis)
    return _means(phis, 1.0).clamp_min_(FLOOR)


def _means(xs, scale: float) -> torch.Tensor:
    """scale * mean(x) per tensor as one fp32 vector (no host round trip)."""
    sums = ops.sums(xs)
    if hasattr(xs, "cache"):  # a FlatList: the factors as a vector, made once per layout
        inverse = ops.cached_vector(xs, ("mean", scale), lambda n: scale / max(n, 1), torch.float32, sums.device)
        return sums.mul_(inverse)
    ops.mul_(list(sums.unbind(0)), [scale / max(x.numel(), 1) for x in xs])  # each value times its factor, in place
    return sums


def cautious_list_(outs, us, gs, tmps=None) -> None:
    """outs <- u phi / max(mean(phi), 1e-3) per tensor; ``outs`` may be ``us`` (then
    ``tmps`` is scratch)."""
    w = tmps if outs is us else outs
    mean = agreement_list_(w, us, gs)
    ops.mul_(outs, w if outs is us else us)
    ops.per_tensor_("div_", outs, mean)
