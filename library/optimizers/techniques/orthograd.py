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

EPS = 1e-30
PARALLEL_TOL = 1e-4


def orthograd_(g: torch.Tensor, w: torch.Tensor, tol: float = PARALLEL_TOL) -> torch.Tensor:
    """Orthogonalise the fp32 tensor ``g`` against ``w`` in place and return it."""
    gf = g.reshape(-1)
    wf = w.reshape(-1)
    if wf.dtype != gf.dtype:
        wf = wf.to(gf.dtype)
    g_norm = torch.linalg.vector_norm(gf)
    proj = torch.dot(wf, gf) / (torch.dot(wf, wf) + EPS)
    g.sub_(w.reshape(g.shape) * proj if w.dtype == g.dtype else w.reshape(g.shape).to(g.dtype) * proj)
    perp_norm = torch.linalg.vector_norm(gf)
    scale = torch.where(perp_norm > tol * g_norm, g_norm / perp_norm.clamp_min(EPS), torch.zeros_like(g_norm))
    return g.mul_(scale)
