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

Every function works in fp32 on lists of tensors (one entry per parameter, multi-tensor
operations), writes into caller-provided buffers and never reads a value back to the host.
"""
from __future__ import annotations

import math

import torch

from . import adabelief, constants, ops

__all__ = [
    "matrix_shape",
    "is_factored",
    "init_state",
    "correction",
    "factored_list_",
    "normalize_list_",
    "rms_clip_list_",
    "confidence_list_",
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


def factored_list_(rows, cols, sqs, outs, beta: float, scale: float = 1.0, keeps=None, oks=None) -> None:
    """Per tensor, on the (n, k) matrix views (n = ``row.numel()``, k = ``col.numel()``):

        row <- beta row + (1 - beta) rowmean(sq)      col <- beta col + (1 - beta) colmean(sq)
        out[i, j] = rsqrt(row_i / mean(row)) * rsqrt(col_j) * scale   (= scale * rsqrt(V^_ij))

    ``scale`` (a bias correction) is folded into the n-vector, not the matrix; ``outs`` may be
    ``sqs``. ``keeps`` / ``oks`` (vectors, one entry per tensor: beta and 1, or 1 and 0 for a
    skipped tensor, techniques/nonfinite.py) leave a skipped tensor's statistics as they were.
    Runs of same-shape tensors lying back to back in memory (chunk scratch, statistics in an
    arena) are computed as one batch, in place, with the same arithmetic as one tensor at a time.
    """
    for a, b in _runs(rows, cols, sqs, outs):
        n, k = rows[a].numel(), cols[a].numel()
        sq, out = _batch(sqs, a, b, n, k), _batch(outs, a, b, n, k)
        R, C = rows[a].as_strided((b - a, n), (n, 1)), cols[a].as_strided((b - a, k), (k, 1))
        mr, mc = sq.mean(dim=2), sq.mean(dim=1)
        if oks is None:
            R.mul_(beta)
            C.mul_(beta)
        else:
            ok, keep = oks[a:b].unsqueeze(1), keeps[a:b].unsqueeze(1)
            mr.mul_(ok)
            mc.mul_(ok)
            R.mul_(keep)
            C.mul_(keep)
        R.add_(mr, alpha=1.0 - beta)  # in place: the run's statistics themselves
        C.add_(mc, alpha=1.0 - beta)
        r = torch.rsqrt(R / R.mean(dim=1, keepdim=True))
        if scale != 1.0:
            r.mul_(scale)
        torch.mul(r.unsqueeze(2), torch.rsqrt(C).unsqueeze(1), out=out)


def _runs(rows, cols, *lists):
    """``(a, b)`` index ranges of consecutive tensors with the same matrix view whose statistics
    (``rows``, ``cols``) and entries of every list in ``lists`` lie back to back in one storage, so
    each is one batch view: (b - a, n), (b - a, k), (b - a, n, k). Chunk scratch and state in an
    arena (FlatLists) always do; scattered tensors make runs of one."""
    lists = (rows, cols) + lists
    tiled = all(hasattr(xs, "flat") for xs in lists)
    out, a = [], 0
    for i in range(1, len(rows) + 1):
        if i < len(rows) and rows[i].numel() == rows[a].numel() and cols[i].numel() == cols[a].numel() \
                and (tiled or all(_adjacent(xs[i - 1], xs[i]) for xs in lists)):
            continue
        out.append((a, i))
        a = i
    return out


def _adjacent(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.is_contiguous() and y.is_contiguous() and x.dtype == y.dtype
            and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
            and y.data_ptr() == x.data_ptr() + x.numel() * x.element_size())


def _batch(xs, a: int, b: int, n: int, k: int) -> torch.Tensor:
    """The (b - a, n, k) view over ``xs[a:b]`` (adjacent in memory, see :func:`_runs`)."""
    return xs[a].as_strided((b - a, n, k), (n * k, k, 1))


def _pick(xs, idx):
    """``xs`` at the indices ``idx``: ``xs`` itself (a FlatList stays one) when that is all of it."""
    return xs if len(idx) == len(xs) else [xs[i] for i in idx]


def _gates(idx, keeps, oks):
    """The gate entries of the tensors ``idx`` (``(None, None)`` without a gate)."""
    if oks is None:
        return None, None
    if len(idx) == len(oks):
        return keeps, oks
    at = constants.index_vector(idx, oks.device)
    return keeps.index_select(0, at), oks.index_select(0, at)


def _statistics(sts, idx, keys, tiled):
    """The factored statistics ``keys`` of the tensors ``idx``, one list per key (FlatLists
    through ``tiled`` where they tile an arena slice)."""
    out = [[sts[i][key] for i in idx] for key in keys]
    return [tiled(ts) for ts in out] if tiled is not None else out


def _split(sts, key):
    """Indices of the factored tensors (``key`` in their state) and of the others."""
    fac = [i for i, st in enumerate(sts) if key in st]
    return fac, [i for i in range(len(sts)) if key not in sts[i]]


def normalize_list_(gs, sts, beta2: float, eps1: float, outs, tmps, bc2: float = 1.0, vs=None, keeps=None,
                    oks=None, tiled=None) -> None:
    """Second-moment step per tensor: update the statistics in ``st`` with ``G = g^2 + eps1`` and
    write ``u = g * rsqrt(V^) * bc2`` into ``outs`` (``bc2 = sqrt(1 - b2^t)`` or 1).

    ``gs``, ``outs`` and ``tmps`` are fp32 and contiguous, shaped as the parameters. ``vs`` (one
    entry per tensor, None for factored ones) overrides ``st["came_v"]`` for unfactored tensors
    (the 8-bit presets pass dequantised copies). ``keeps`` / ``oks``: see :func:`factored_list_`
    (they gate the factored statistics only; the caller restores full ones). ``tiled`` (the
    optimizer's ``Arenas.tiled``) hands the factored statistics over as a FlatList where they
    lie in one arena, so each run of them is one view.
    """
    ops.product_(tmps, gs, gs)
    ops.add_(tmps, eps1)
    fac, full = _split(sts, "came_row")
    if fac:
        rows, cols = _statistics(sts, fac, ("came_row", "came_col"), tiled)
        factored_list_(rows, cols, _pick(tmps, fac), _pick(outs, fac), beta2, bc2, *_gates(fac, keeps, oks))
    if full:
        v = [sts[i]["came_v"] if vs is None or vs[i] is None else vs[i] for i in full]
        out = [outs[i] for i in full]
        ops.mul_(v, beta2)
        ops.add_(v, [tmps[i] for i in full], alpha=1.0 - beta2)
        ops.into_("rsqrt", out, v)
    ops.mul_(outs, gs)
    if full and bc2 != 1.0:
        ops.mul_([outs[i] for i in full], bc2)


def rms_clip_list_(us, threshold: float) -> None:
    """``u <- u / max(1, RMS(u) / threshold)`` per tensor (0-dim divisors, no host sync)."""
    rms = ops.norms(us)  # the bits of torch._foreach_norm, one reduction per run on flat scratch
    rms.div_(constants.sqrt_numels(us, rms.dtype, rms.device))
    ops.per_tensor_("div_", us, rms.div_(threshold).clamp_min_(1.0))


def confidence_list_(us, ms, sts, beta3: float, eps2: float, outs, bc3: float = 1.0, ress=None, keeps=None,
                     oks=None, tiled=None) -> None:
    """Confidence-guided direction ``s = m * rsqrt(U^) * bc3`` into ``outs`` (factored tensors).

    ``U = (u - m)^2 + eps2`` uses the already-updated ``m``. For unfactored tensors official
    CAME has no confidence: ``s = m`` unless a full residual EMA is kept (``st["came_res"]``,
    or the entry of ``ress``), in which case ``s = m * rsqrt(res) * bc3`` with
    ``res <- b3 res + (1 - b3) U`` (the AdaBelief-style residual, see :mod:`.adabelief`).
    ``outs`` must not alias ``us`` or ``ms``; ``keeps`` / ``oks`` / ``tiled`` as in :func:`normalize_list_`.
    """
    adabelief.residual_list_(outs, us, ms, eps2)
    fac, full = _split(sts, "came_res_row")
    if fac:
        out = _pick(outs, fac)
        rows, cols = _statistics(sts, fac, ("came_res_row", "came_res_col"), tiled)
        factored_list_(rows, cols, out, out, beta3, bc3, *_gates(fac, keeps, oks))
        ops.mul_(out, _pick(ms, fac))
    res = [sts[i].get("came_res") if ress is None or ress[i] is None else ress[i] for i in full]
    kept = [j for j, r in enumerate(res) if r is not None]
    if kept:
        idx = [full[j] for j in kept]
        rs = [res[j] for j in kept]
        adabelief.update_residual_list_(rs, [outs[i] for i in idx], beta3)
        adabelief.direction_list_([outs[i] for i in idx], [ms[i] for i in idx], rs, bc3)
    plain = [full[j] for j, r in enumerate(res) if r is None]
    if plain:
        ops.copy_([outs[i] for i in plain], [ms[i] for i in plain])


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
    normalize_list_([g], [st], b2, eps[0], [u], [tmp], bc2=correction(b2, t, bias_correction))
    rms_clip_list_([u], clip_threshold)
    m = st["exp_avg"]
    m.mul_(b1).add_(u, alpha=1.0 - b1)
    confidence_list_([u], [m], [st], b3, eps[1], [tmp], bc3=correction(b3, t, bias_correction))
    with torch.no_grad():
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(tmp.to(p.dtype), alpha=-lr)
    return p
