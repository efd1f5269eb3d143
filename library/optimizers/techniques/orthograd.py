"""OrthoGrad (Prieto et al., "Grokking at the Edge of Numerical Stability", arXiv 2501.04697).

    proj  = <w, g> / (<w, w> + eps)
    g_perp = g - proj * w
    g'    = g_perp * ||g|| / ||g_perp||            (norm preserving)

Whole-tensor projection in fp32. Guard: when g is (numerically) parallel to w the remainder
is round-off noise; if ||g_perp|| < tol * ||g|| the gradient becomes zero instead of being
rescaled into a random direction. w = 0 leaves g unchanged.
"""
from __future__ import annotations

import torch

from . import ops

EPS = 1e-30
PARALLEL_TOL = 1e-4


def dots(xs, ys, scratch=None) -> torch.Tensor:
    """<x_i, y_i> for each pair, as one fp32 vector: one reduction per tensor, or, given fp32
    ``scratch`` laid out like ``xs``, the sums of the products written into it (one product pass
    and one reduction per run of same-sized tensors where the lists are flat scratch)."""
    if scratch is not None:
        ops.product_(scratch, xs, ys)
        return ops.sums(scratch)
    xs1, ys1 = ops.vectors(xs), ops.vectors(ys)
    out = [torch.dot(x, y if y.dtype == x.dtype else y.to(x.dtype)) for x, y in zip(xs1, ys1)]
    return torch.stack(out).float()


def orthograd_list_(gs, ws, tol: float = PARALLEL_TOL) -> None:
    """Orthogonalise each fp32 tensor ``g`` against its ``w`` in place."""
    g_norms = ops.norms(gs)
    w_sq = dots(ws, ws)
    proj = dots(gs, ws) / (w_sq + EPS)
    w32 = [w if w.dtype == g.dtype else w.to(g.dtype) for w, g in zip(ws, gs)]
    ops.addcmul_(gs, w32, proj.neg())
    perp = ops.norms(gs)
    scale = torch.where(perp > tol * g_norms, g_norms / perp.clamp_min(EPS), torch.zeros_like(g_norms))
    ops.mul_(gs, scale)
