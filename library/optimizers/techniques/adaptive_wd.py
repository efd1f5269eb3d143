"""AdaDecay, adaptive weight decay (Nakamura & Hong, IEEE Access 2019, arXiv 1907.08931).

The decay rate of each parameter grows with the magnitude of its gradient, normalised
within its layer (here: within the tensor), through a sigmoid:

    z_i      = (|g_i| - mean(|g|)) / std(|g|)        (per tensor; population std)
    theta_i  = 2 * sigmoid(alpha * z_i)              in (0, 2); 1 for an average element
    p_i     <- p_i * (1 - lr_i * wd * theta_i)       (decoupled, per-element lr)

Guards: a tensor whose |g| is uniform (std = 0, including single-element tensors and an
all-zero gradient) gets theta = 1 everywhere (plain decoupled decay), never NaN.
The Automagic_CameAMP lineage used one z per tensor (its mean |g| standardised over the
whole group) and only during the first warmup/2 steps; this is the paper's per-element
form, applied at every step.
"""
from __future__ import annotations

import torch

from . import constants, ops

__all__ = ["standardizers", "factor_list_"]

TINY = 1e-30


def standardizers(l1: torch.Tensor, l2: torch.Tensor, numel: torch.Tensor, alpha: float):
    """``(k, b)`` with ``alpha * z = k |g| + b`` for one or many tensors at once.

    ``l1 = ||g||_1``, ``l2 = ||g||_2`` and ``numel`` are 0-dim or 1-D (one entry per tensor,
    e.g. from ``torch._foreach_norm``): mean = l1 / n, std = sqrt(l2^2 / n - mean^2),
    k = alpha / std (0 where std is 0: theta = 1), b = -mean k.
    """
    mean = l1.float() / numel
    std = torch.sqrt(torch.clamp_min(l2.float().square() / numel - mean * mean, 0.0))
    k = torch.where(std > 1e-12 * mean.clamp_min(TINY), alpha / std.clamp_min(TINY), torch.zeros_like(std))
    return k, -mean * k


def factor_list_(outs, gs, alpha: float, l2=None) -> None:
    """``out = sigmoid(alpha * z)`` per tensor, z the standardised |g| of that tensor (theta / 2:
    callers fold the 2 into their own coefficient).

    The L1 norms are the sums of the |g| this writes into ``outs`` anyway (one reduction per run
    of same-sized tensors on chunk scratch); ``l2`` (1-D, one entry per tensor) may be passed
    when already known (the non-finite gate computes it for the whole group).
    """
    ops.into_("abs", outs, gs)
    l1 = ops.sums(outs)
    l2 = ops.norms(gs) if l2 is None else l2
    k, b = standardizers(l1, l2, constants.numels(gs, torch.float32, l1.device), alpha)
    ops.per_tensor_("mul_", outs, k)  # alpha * (|g| - mean) / std
    ops.per_tensor_("add_", outs, b)
    ops.sigmoid_(outs)
