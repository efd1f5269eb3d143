"""ALLoRA-style row scaling (Huang & Balestriero, arXiv 2410.09692).

    kappa_i = 1 / sqrt(||theta_i||^2 + 1/eta^2)      (row i = slice along dim 0)

We use it as a relative lr factor kappa_i * eta = 1 / sqrt(1 + eta^2 ||theta_i||^2): exactly 1
for a zero row (LoRA B at init), falling as the row grows. Recomputed from current norms every
step (never frozen at init).
"""
from __future__ import annotations

import torch


def row_scale(w: torch.Tensor, eta: float) -> torch.Tensor:
    """Relative per-row factor, shaped to broadcast against ``w``."""
    rows = w.reshape(w.shape[0], -1) if w.ndim > 0 else w.reshape(1, 1)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    scale = norms.square_().mul_(eta * eta).add_(1.0).rsqrt_()
    return scale.reshape((w.shape[0],) + (1,) * (w.ndim - 1)) if w.ndim > 0 else scale.reshape(())
