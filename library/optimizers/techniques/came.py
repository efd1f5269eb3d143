"""CAME, Confidence-guided Adaptive Memory Efficient optimization (Luo et al., ACL 2023,
arXiv 2307.02047; reference code yangluo7/CAME ``came_pytorch/CAME.py``).

Per tensor, gradient g, step t, betas (b1, b2, b3), eps (e1, e2):

    G = g^2 + e1
    factored (matrix view W of shape (n, k), see below):
        R <- b2 R + (1 - b2) rowmean(G)          (n values)
        C <- b2 C + (1 - b2) colmean(G)          (k values)
        V^_ij = R_i C_j / mean(R)                (Adafactor's rank-1 estimate of the EMA of G)
    unfactored (0-D / 1-D):  V <- b2 V + (1 - b2) G ;  V^ = V
    u = g / sqrt(V^ / c2)                        c2 = 1 - b2^t  (c2 = 1: official, no correction)
    u <- u / max(1, RMS(u) / clip_threshold)
    m <- b1 m + (1 - b1) u
    U = (u - m)^2 + e2                           (instability, with the *updated* m)
    factored:   R_U, C_U as R, C with b3;  U^ = R_U,i C_U,j / mean(R_U)
                s = m / sqrt(U^ / c3)            c3 = 1 - b3^t  (c3 = 1: official)
    unfactored: s = m                            (official CAME has no confidence on vectors)
    p <- p - lr * wd * p ;  p <- p - lr * s

Matrix view. Official CAME factors over the last two dims and treats leading dims as batch.
Here every tensor with ``ndim >= 2`` is viewed as ``(shape[0], numel / shape[0])`` (rows are
output units): a conv weight ``(out, in, kh, kw)`` factors as ``(out, in*kh*kw)``. For a
1x1-conv LoRA factor ``(r, in, 1, 1)`` the official layout would keep ``(r, in, 1)``-sized row
*and* column statistics (two full copies of the tensor, and a trivial 1x1 factorisation);
the flattened view costs ``r + in`` values, exactly what the equivalent Linear factor costs.
For 2-D tensors the two layouts coincide (tests compare with came-pytorch there). Leading
dims are never batch dims here, including for 3-D tensors ``(b, n, k)`` -> ``(b, n*k)``.

Bias correction (``c2``, ``c3``) is our documented deviation, used by the Automagic presets:
without it the first step on a matrix moves every element by about
``(1 - b1) / (b1 sqrt(1 - b3)) * lr`` (11.1 lr at the default betas) while vectors move
0.1 lr (spec/algorithms.md section 1). With it the first move is ``(1 - b1)/b1 * lr`` on
matrices (0.11 lr at b1 = 0.9) and ``(1 - b1) * lr`` on vectors: both start small and
ramp up as the momentum fills, the way ADOPT does. ``c = 1`` reproduces the official code.

Every function works in fp32 on one tensor, writes into caller-provided buffers and never
reads a value back to the host.
"""
from __future__ import annotations

import math

import torch

from . import adabelief

__all__ = [
    "matrix_shape",
    "is_factored",
    "init_state",
    "correction",
    "factored_rsqrt",
    "update_factored_",
    "normalize",
    "rms_clip_",
    "confidence",
    "reference_step",
]


def matrix_shape(shape) -> tuple[int, int] | None:
    """The 2-D view ``(shape[0], numel // shape[0])`` used for factoring, or None for 0-D/1-D."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    rows = shape[0]
    cols = math.prod(shape[1:])
    return rows, cols


def is_factored(shape) -> bool:
    return matrix_shape(shape) is not None and math.prod(shape) > 0


def init_state(p: torch.Tensor, confidence_full: bool = False) -> dict:
    """Zero statistics for ``p`` (fp32): factored row/col EMAs, or a full second moment.

    Keys: ``came_row``, ``came_col``, ``came_res_row``, ``came_res_col`` (factored) or
    ``came_v`` (unfactored; plus ``came_res`` when ``confidence_full``, see
    :mod:`.adabelief`). Factored statistics are tiny and always fp32.
    """
    dev = p.device
    view = matrix_shape(p.shape) if is_factored(p.shape) else None
    st = {}
    if view is not None:
        r, c = view
        st["came_row"] = torch.zeros(r, dtype=torch.float32, device=dev)
        st["came_col"] = torch.zeros(c, dtype=torch.float32, device=dev)
        st["came_res_row"] = torch.zeros(r, dtype=torch.float32, device=dev)
        st["came_res_col"] = torch.zeros(c, dtype=torch.float32, device=dev)
    else:
        st["came_v"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if confidence_full:
            st["came_res"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
    return st


def correction(beta: float, t: int, enabled: bool = True) -> float:
    """``sqrt(1 - beta^t)``: the factor that bias-corrects ``x / sqrt(EMA)`` (1.0 if disabled)."""
    return math.sqrt(1.0 - beta**t) if enabled else 1.0


def factored_rsqrt(row: torch.Tensor, col: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``out[i, j] = rsqrt(row_i / mean(row)) * rsqrt(col_j) * scale`` = ``scale * rsqrt(V^_ij)``.

    ``out`` is (n, k); ``scale`` (a bias correction) is folded into the n-vector, not the matrix.
    """
    r = torch.rsqrt(row / row.mean())
    if scale != 1.0:
        r.mul_(scale)
    c = torch.rsqrt(col)
    return torch.mul(r.unsqueeze(1), c.unsqueeze(0), out=out)


def update_factored_(row: torch.Tensor, col: torch.Tensor, sq: torch.Tensor, beta: float) -> None:
    """EMA of the row and column means of the (n, k) tensor ``sq``."""
    row.mul_(beta).add_(sq.mean(dim=1), alpha=1.0 - beta)
    col.mul_(beta).add_(sq.mean(dim=0), alpha=1.0 - beta)


def normalize(g: torch.Tensor, st: dict, beta2: float, eps1: float, out: torch.Tensor, tmp: torch.Tensor,
              bc2: float = 1.0, v: torch.Tensor | None = None) -> torch.Tensor:
    """Second-moment step: update the statistics with ``G = g^2 + eps1`` and return
    ``u = g * rsqrt(V^) * bc2`` in ``out`` (``bc2 = sqrt(1 - b2^t)`` or 1).

    ``g``, ``out`` and ``tmp`` share p's shape (fp32, contiguous). ``v`` overrides
    ``st["came_v"]`` for unfactored tensors (the 8-bit presets pass a dequantised copy).
    """
    torch.mul(g, g, out=tmp).add_(eps1)
    if "came_row" in st:
        view = (st["came_row"].numel(), st["came_col"].numel())
        update_factored_(st["came_row"], st["came_col"], tmp.view(view), beta2)
        factored_rsqrt(st["came_row"], st["came_col"], out=out.view(view), scale=bc2)
        return out.mul_(g)
    v = st["came_v"] if v is None else v
    v.mul_(beta2).add_(tmp, alpha=1.0 - beta2)
    torch.rsqrt(v, out=out).mul_(g)
    if bc2 != 1.0:
        out.mul_(bc2)
    return out


def rms_clip_(u: torch.Tensor, threshold: float) -> torch.Tensor:
    """``u <- u / max(1, RMS(u) / threshold)`` (0-dim divisor, no host sync)."""
    rms = torch.linalg.vector_norm(u.reshape(-1)) / math.sqrt(max(u.numel(), 1))
    return u.div_((rms / threshold).clamp_(min=1.0))


def confidence(u: torch.Tensor, m: torch.Tensor, st: dict, beta3: float, eps2: float, out: torch.Tensor,
               bc3: float = 1.0, res: torch.Tensor | None = None) -> torch.Tensor:
    """Confidence-guided direction ``s = m * rsqrt(U^) * bc3`` into ``out`` (factored tensors).

    ``U = (u - m)^2 + eps2`` uses the already-updated ``m``. For unfactored tensors official
    CAME has no confidence: ``s = m`` unless a full residual EMA is given (``res`` or
    ``st["came_res"]``), in which case ``s = m * rsqrt(res) * bc3`` with
    ``res <- b3 res + (1 - b3) U`` (the AdaBelief-style residual, see :mod:`.adabelief`).
    ``out`` may alias ``u``.
    """
    adabelief.residual(u, m, eps2, out=out)
    if "came_res_row" in st:
        view = (st["came_res_row"].numel(), st["came_res_col"].numel())
        update_factored_(st["came_res_row"], st["came_res_col"], out.view(view), beta3)
        factored_rsqrt(st["came_res_row"], st["came_res_col"], out=out.view(view), scale=bc3)
        return out.mul_(m)
    res = st.get("came_res") if res is None else res
    if res is None:
        return out.copy_(m)
    adabelief.update_residual_(res, out, beta3)
    return adabelief.direction(m, res, bc3, out=out)


def reference_step(p, g, st, lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0,
                   weight_decay=0.0, bias_correction=False):
    """One plain CAME step on ``p`` (in place) written from the equations above, on the
    matrix view; ``st`` starts as ``{}``. For tests and documentation, not speed."""
    b1, b2, b3 = betas
    if not st:
        st.update(init_state(p))
        st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        st["step"] = 0
    st["step"] += 1
    t = st["step"]
    g = g.float().contiguous()
    u, tmp = torch.empty_like(g), torch.empty_like(g)
    normalize(g, st, b2, eps[0], u, tmp, bc2=correction(b2, t, bias_correction))
    rms_clip_(u, clip_threshold)
    m = st["exp_avg"]
    m.mul_(b1).add_(u, alpha=1.0 - b1)
    s = confidence(u, m, st, b3, eps[1], out=tmp, bc3=correction(b3, t, bias_correction))
    with torch.no_grad():
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(s.to(p.dtype), alpha=-lr)
    return p
