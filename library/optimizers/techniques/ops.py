"""Multi-tensor operations that run as one operation where the tensors lie back to back.

Chunk scratch from ``BufferPool.views`` is a :class:`~library.optimizers.buffer_pool.FlatList`: the
per-tensor views plus the flat tensor they tile exactly (``.flat``). An operation whose tensor-list
operands are all FlatLists (the other operands Python scalars) runs once on the flat tensors;
anything else (optimizer state, per-tensor 0-dim factors, a selection of tensors) runs as the
matching ``torch._foreach_*`` call. Every operation here is elementwise, so the bits are the same
either way (tests/test_techniques.py checks it); only the number of kernel calls changes.

A per-tensor operand (one value per tensor) may be a 1-D tensor (a *vector*, the cheap form: no
0-dim views are made) or a list of 0-dim tensors. On a FlatList it runs as one broadcast
operation per run of same-sized tensors, or, where the chunk has many short runs (many small
tensors of mixed sizes), as one operation against the vector expanded to one value per element.
"""
from __future__ import annotations

import torch

from . import constants

__all__ = ["per_tensor_", "copy_", "into_", "affine_", "divide_into_", "positive_", "mul_", "product_", "add_", "sub_", "div_", "pow_", "lerp_", "addcmul_", "addcdiv_", "clamp_min_",
           "clamp_max_", "clamp_", "expand", "cached_vector", "values", "set_values_", "vectors", "sums", "norms", "abs_", "sign_", "exp_", "sigmoid_", "sqrt_", "rsqrt_", "zero_"]


def _flat(xs):
    return getattr(xs, "flat", None)


def _vector(y) -> bool:
    """Is ``y`` one value per tensor as a 1-D tensor?"""
    return isinstance(y, torch.Tensor) and y.dim() == 1


def _scalars(y) -> bool:
    """Is ``y`` a list of 0-dim tensors (one value per tensor)?"""
    return isinstance(y, list) and bool(y) and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in y)


def as_vector(y) -> torch.Tensor:
    """One value per tensor as one 1-D tensor: ``y`` itself when it is one, else the stacked
    0-dim tensors."""
    return y if _vector(y) else torch.stack(y)


def _as_list(y):
    return list(y.unbind(0)) if _vector(y) else y


# a chunk with more runs than this, averaging fewer than _EXPAND_RUN_NUMEL elements a run, expands
# a per-tensor vector to its elements instead of looping over the runs: one op and a chunk-sized
# temporary (memory traffic) instead of a Python-level loop (a few microseconds a run)
_MAX_RUNS = 8
_EXPAND_RUN_NUMEL = 4096


def _expand_pays(xs) -> bool:
    runs = len(xs.runs)
    return runs > _MAX_RUNS and xs.flat.numel() <= runs * _EXPAND_RUN_NUMEL


def expand(xs, values: torch.Tensor) -> torch.Tensor:
    """``values`` (one per tensor of the FlatList ``xs``) repeated over each tensor's elements:
    a flat tensor shaped like ``xs.flat``."""
    counts = cached_vector(xs, "count", lambda n: n, torch.long, values.device)
    return values.repeat_interleave(counts, output_size=xs.flat.numel())


def cached_vector(xs, tag, value, dtype, device) -> torch.Tensor:
    """``[value(x.numel()) for x in xs]`` for the FlatList ``xs`` as a vector on ``device``: a layout
    constant (``constants.size_vector``, made on a layout's first step only), also kept with ``xs``
    so later steps do not go through the sizes again."""
    key = (tag, dtype, device)
    hit = xs.cache.get(key)
    if hit is None:
        hit = xs.cache[key] = constants.size_vector(xs, tag, value, dtype, device)
    return hit


def _binary(name: str, xs, y, **kw) -> None:
    fx = _flat(xs)
    if fx is not None:
        if isinstance(y, (int, float)) or (isinstance(y, torch.Tensor) and y.dim() == 0):
            getattr(fx, name)(y, **kw)  # one value for every tensor (a number or a 0-dim tensor)
            return
        fy = _flat(y)
        if fy is not None:
            getattr(fx, name)(fy, **kw)
            return
        if not kw and name in ("mul_", "div_", "add_") and (_vector(y) or _scalars(y)):
            per_tensor_(name, xs, as_vector(y))  # one value per tensor
            return
    getattr(torch, f"_foreach_{name}")(xs, _as_list(y), **kw)


def _unary(name: str, xs) -> None:
    fx = _flat(xs)
    if fx is not None:
        getattr(fx, name)()
    else:
        getattr(torch, f"_foreach_{name}")(xs)


def _with_values(xs, ys, values, op) -> None:
    """``op(x, y, w)`` over the FlatLists ``xs``, ``ys`` (one layout) with ``w`` one value per
    tensor: once with ``values`` expanded, or once per run with them broadcast."""
    fx, fy = xs.flat, ys.flat
    if _expand_pays(xs):
        op(fx, fy, expand(xs, values))
        return
    for first, end, offset, n in xs.runs:
        k = end - first
        op(fx[offset:offset + k * n].view(k, n), fy[offset:offset + k * n].view(k, n), values[first:end].unsqueeze(1))


def per_tensor_(name: str, xs, values: torch.Tensor) -> None:
    """``x <op>= values[i]`` for the i-th tensor (``name``: "mul_", "div_" or "add_"; ``values``
    a 1-D fp32 tensor): on a FlatList one broadcast operation per run of same-sized tensors (or
    one against the expanded vector, see ``_MAX_RUNS``), else ``torch._foreach_<name>`` with the
    values' 0-dim views."""
    fx = _flat(xs)
    if fx is None:
        getattr(torch, f"_foreach_{name}")(xs, list(values.unbind(0)))
        return
    if _expand_pays(xs):
        getattr(fx, name)(expand(xs, values))
        return
    for first, end, offset, n in xs.runs:
        getattr(fx[offset:offset + (end - first) * n].view(end - first, n), name)(values[first:end].unsqueeze(1))


# torch reduces a tensor of at most this many elements on one thread (at::internal::GRAIN_SIZE);
# up to it, one reduction over a run's (count, numel) view gives each tensor the bits of reducing
# it alone, at any thread count (larger tensors are reduced one by one, as before)
_SERIAL_NUMEL = 32768


def _run_reduce(xs, batched, single) -> torch.Tensor:
    """One value per tensor of ``xs`` as a vector: ``batched`` on each run's ``(count, numel)``
    view of a FlatList where the tensors are small enough (see ``_SERIAL_NUMEL``), ``single`` on
    a list of tensors otherwise."""
    fx = _flat(xs)
    if fx is None or fx.dtype != torch.float32:
        return single(list(xs))
    parts = []
    for first, end, offset, n in xs.runs:
        if n <= _SERIAL_NUMEL:
            parts.append(batched(fx[offset:offset + (end - first) * n].view(end - first, n)))
        else:
            parts.append(single(xs[first:end]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def values(xs) -> torch.Tensor:
    """0-dim tensors as one vector: the FlatList's flat tensor itself (a view: read it before
    writing the tensors), else a stacked copy."""
    fx = _flat(xs)
    return fx if fx is not None else torch.stack(list(xs))


def set_values_(xs, vector: torch.Tensor) -> None:
    """Each 0-dim tensor of ``xs`` takes its entry of ``vector``."""
    fx = _flat(xs)
    if fx is not None:
        fx.copy_(vector)
    else:
        torch._foreach_copy_(list(xs), list(vector.unbind(0)))


def vectors(xs) -> list:
    """Each tensor of ``xs`` as a 1-D view (kept with a FlatList, made once per layout)."""
    cache = getattr(xs, "cache", None)
    hit = None if cache is None else cache.get("vectors")
    if hit is None:
        hit = [x.reshape(-1) for x in xs]
        if cache is not None:
            cache["vectors"] = hit
    return hit


def sums(xs) -> torch.Tensor:
    """The fp32 sum of each tensor, as one vector (bit-identical to ``x.sum(dtype=float32)`` each)."""
    return _run_reduce(xs, lambda v: v.sum(1, dtype=torch.float32),
                       lambda ts: torch.stack([x.sum(dtype=torch.float32) for x in ts]))


def norms(xs) -> torch.Tensor:
    """The L2 norm of each tensor, as one fp32 vector (bit-identical to ``torch._foreach_norm``)."""
    return _run_reduce(xs, lambda v: torch.linalg.vector_norm(v, dim=1).float(),
                       lambda ts: torch.stack(torch._foreach_norm(ts)).float())


def copy_(dst, src) -> None:
    fd, fs = _flat(dst), _flat(src)
    if fd is not None and fs is not None:
        fd.copy_(fs)
    else:
        torch._foreach_copy_(dst, src)


def mul_(xs, y) -> None:
    _binary("mul_", xs, y)


def product_(outs, xs, ys) -> None:
    """``out <- x y`` (tensors of the same shapes; ``outs`` distinct from both): :func:`into_`."""
    into_("mul", outs, xs, ys)


def positive_(xs) -> None:
    """``x <- 1[x > 0]`` (1.0 or +0.0; NaN gives 0): one comparison written into the flat scratch
    (``torch.gt`` with a float ``out``: the bits of ``torch.heaviside(x, 0)``, at a fraction of its
    CPU time),
    else sign then clamp at 0 (-0.0 and NaN left as they are: callers pass finite values)."""
    fx = _flat(xs)
    if fx is not None:
        torch.gt(fx, 0.0, out=fx)
    else:
        torch._foreach_sign_(xs)
        torch._foreach_clamp_min_(xs, 0.0)


def affine_(xs, scale: float, shift: float) -> None:
    """``x <- shift + scale x``: one pass on flat scratch (product and sum rounded once), else a
    multiply and an add. The two agree bit for bit wherever ``scale x`` is exact in fp32, as it
    is for the lr mask's agreement (x in {-1, 0, 1})."""
    fx = _flat(xs)
    if fx is not None:
        torch.add(constants.constant(("value", shift, fx.dtype, fx.device),
                                     lambda: torch.tensor(shift, dtype=fx.dtype, device=fx.device)),
                  fx, alpha=scale, out=fx)
    else:
        torch._foreach_mul_(xs, scale)
        torch._foreach_add_(xs, shift)


def into_(name: str, outs, xs, *args) -> None:
    """``out <- torch.<name>(x, *args)`` per tensor (``name``: "abs", "sqrt", "rsqrt", "clamp_min",
    "mul", "sub"; an argument may be a tensor list like ``xs`` or a number) into ``outs``, distinct
    from every operand: one operation with ``out=`` where the lists are all FlatLists, else a copy
    and the in-place operation (the same bits either way: one pass over the memory fewer)."""
    fo, fx = _flat(outs), _flat(xs)
    flat_args = [a if isinstance(a, (int, float)) else _flat(a) for a in args]
    # same dtypes only: out= would compute in x's dtype and then cast, where the copy widens first
    if fo is not None and fx is not None and fx.dtype == fo.dtype and all(a is not None for a in flat_args):
        getattr(torch, name)(fx, *flat_args, out=fo)
        return
    copy_(outs, xs)
    _IN_PLACE[name](outs, *args)


def divide_into_(outs, nums) -> None:
    """``out <- num / out`` per tensor (the divisor overwritten by the quotient): one operation on
    flat scratch, else one per tensor (the same bits)."""
    fo, fn = _flat(outs), _flat(nums)
    if fo is not None and fn is not None and fn.dtype == fo.dtype:
        torch.div(fn, fo, out=fo)
        return
    for o, n in zip(outs, nums):
        torch.div(n, o, out=o)


def add_(xs, y, alpha: float = 1.0) -> None:
    if alpha == 1.0:
        _binary("add_", xs, y)
    else:
        _binary("add_", xs, y, alpha=alpha)


def sub_(xs, y) -> None:
    _binary("sub_", xs, y)


def div_(xs, y) -> None:
    _binary("div_", xs, y)


def pow_(xs, exponent: float) -> None:
    _binary("pow_", xs, exponent)


def clamp_min_(xs, lo: float) -> None:
    _binary("clamp_min_", xs, lo)


def clamp_max_(xs, hi: float) -> None:
    _binary("clamp_max_", xs, hi)


def clamp_(xs, lo: float, hi: float) -> None:
    """``x <- min(max(x, lo), hi)``."""
    fx = _flat(xs)
    if fx is not None:
        fx.clamp_(lo, hi)
    else:
        torch._foreach_clamp_min_(xs, lo)
        torch._foreach_clamp_max_(xs, hi)


def lerp_(xs, ys, weight) -> None:
    """``x <- x + w (y - x)``; ``weight`` a number or one value per tensor."""
    fx, fy = _flat(xs), _flat(ys)
    if fx is not None and fy is not None:
        if isinstance(weight, (int, float)):
            fx.lerp_(fy, weight)
            return
        if _vector(weight) or _scalars(weight):
            _with_values(xs, ys, as_vector(weight), lambda x, y, w: x.lerp_(y, w))
            return
    torch._foreach_lerp_(xs, ys, _as_list(weight))


def addcmul_(xs, t1, t2, value: float = 1.0) -> None:
    """``x <- x + value t1 t2``; ``t2`` tensors like ``t1`` or one value per tensor."""
    fx, f1, f2 = _flat(xs), _flat(t1), _flat(t2)
    if fx is not None and f1 is not None:
        if f2 is not None:
            fx.addcmul_(f1, f2, value=value)
            return
        if _vector(t2) or _scalars(t2):
            _with_values(xs, t1, as_vector(t2), lambda x, y, w: x.addcmul_(y, w, value=value))
            return
    torch._foreach_addcmul_(xs, t1, _as_list(t2), value=value)


def addcdiv_(xs, t1, t2, value: float = 1.0) -> None:
    fx, f1, f2 = _flat(xs), _flat(t1), _flat(t2)
    if fx is not None and f1 is not None and f2 is not None:
        fx.addcdiv_(f1, f2, value=value)
    else:
        torch._foreach_addcdiv_(xs, t1, t2, value=value)


def abs_(xs) -> None:
    _unary("abs_", xs)


def sign_(xs) -> None:
    _unary("sign_", xs)


def exp_(xs) -> None:
    _unary("exp_", xs)


def sigmoid_(xs) -> None:
    _unary("sigmoid_", xs)


def sqrt_(xs) -> None:
    _unary("sqrt_", xs)


def rsqrt_(xs) -> None:
    _unary("rsqrt_", xs)


def zero_(xs) -> None:
    _unary("zero_", xs)


# the in-place form of each operation :func:`into_` writes out of place
_IN_PLACE = {"abs": abs_, "sqrt": sqrt_, "rsqrt": rsqrt_, "clamp_min": clamp_min_, "mul": mul_, "sub": sub_}
