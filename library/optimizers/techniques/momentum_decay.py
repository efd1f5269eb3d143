"""Momentum decay, the "consistency momentum" of the Automagic_CameAMP lineage
(Xu, Mi, Wang, Chen, "Towards Faster Training of Diffusion Models: An Inspiration of A
Consistency Phenomenon", arXiv 2404.07946, strategy MDLRC).

The paper observes that the diffusion loss landscape is smooth and that a large momentum
coefficient then slows convergence and oscillates; it lowers the coefficient during
training and, for heavy-ball momentum (step ~ g / (1 - b)), compensates the lr by
(1 - b0) / (1 - b_t). Our momentum is an EMA, m <- b m + (1 - b) x, whose step scale does
not depend on b, so no compensation is needed. Schedule (the lineage's exponential form,
counted from the step the decay starts, so b is continuous there):

    b_k = max(b0 * decay^k, b_min)          k = steps since the decay started (k >= 0)
    m  <- b_k m + (1 - b_k) x
"""
from __future__ import annotations

from . import ops

__all__ = ["beta_at", "momentum_list_"]


def beta_at(beta0: float, decay: float, floor: float, k: int) -> float:
    """Decayed coefficient after ``k`` steps; never above ``beta0`` nor below ``min(floor, beta0)``."""
    return max(beta0 * decay ** max(k, 0), min(floor, beta0))


def momentum_list_(ms, xs, beta: float, keeps=None) -> None:
    """``m <- beta m + (1 - beta) x`` per tensor (any EMA of a fixed ``beta``); ``keeps`` (one 0-dim
    tensor per m: beta, or 1 for a skipped tensor whose x is 0, see techniques/nonfinite.py)
    replaces the first beta."""
    ops.mul_(ms, beta if keeps is None else keeps)
    ops.add_(ms, xs, alpha=1.0 - beta)
