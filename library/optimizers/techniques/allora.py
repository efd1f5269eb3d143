"""ALLoRA-style row scaling (Huang & Balestriero, arXiv 2410.09692).

    kappa_i = 1 / sqrt(||theta_i||^2 + 1/eta^2)      (row i = slice along dim 0)

We use it as a relative lr factor kappa_i * eta = 1 / sqrt(1 + eta^2 ||theta_i||^2): exactly 1
for a zero row (LoRA B at init), falling as the row grows. Recomputed from current norms every
step (never frozen at init).
"""
from __future__ import annotations

import torch

from . import ops


def row_scale(w: torch.Tensor, eta: float) -> torch.Tensor:
    """Relative per-row factor, shaped to broadcast against ``w``."""
    rows = w.reshape(w.shape[0], -1) if w.ndim > 0 else w.reshape(1, 1)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    scale = norms.square_().mul_(eta * eta).add_(1.0).rsqrt_()
    return scale.reshape((w.shape[0],) + (1,) * (w.ndim - 1)) if w.ndim > 0 else scale.reshape(())


def scale_rows_list_(us, ws, eta: float, selected) -> None:
    """``u <- u * row_scale(w, eta)`` for each index in ``selected``. Small tensors of one shape
    (see ``ops._SERIAL_NUMEL``) are scaled together: their rows' norms in one reduction over the
    stacked weights and one multi-tensor multiply, the same bits as one tensor at a time."""
    by_shape: dict = {}
    for i in selected:
        w = ws[i]
        if w.ndim >= 1 and w.numel() <= ops._SERIAL_NUMEL:
            by_shape.setdefault(tuple(w.shape), []).append(i)
        else:
            us[i].mul_(row_scale(w, eta))
    for shape, idx in by_shape.items():
        if len(idx) == 1:
            us[idx[0]].mul_(row_scale(ws[idx[0]], eta))
            continue
        rows = torch.stack([ws[i] for i in idx]).reshape(len(idx), shape[0], -1)
        scale = torch.linalg.vector_norm(rows, dim=2, dtype=torch.float32).square_().mul_(eta * eta).add_(1.0).rsqrt_()
        scale = scale.reshape((len(idx), shape[0]) + (1,) * (len(shape) - 1))
        torch._foreach_mul_([us[i] for i in idx], list(scale.unbind(0)))
