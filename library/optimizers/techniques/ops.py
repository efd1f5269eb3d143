"""Multi-tensor operations that run as one operation where the tensors lie back to back.

Chunk scratch from ``BufferPool.views`` is a :class:`~library.optimizers.buffer_pool.FlatList`: the
per-tensor views plus the flat tensor they tile exactly (``.flat``). An operation whose tensor-list
operands are all FlatLists (the other operands Python scalars) runs once on the flat tensors;
anything else (optimizer state, per-tensor 0-dim factors, a selection of tensors) runs as the
matching ``torch._foreach_*`` call. Every operation here is elementwise, so the bits are the same
either way (tests/test_techniques.py checks it); only the number of kernel calls changes.
"""
from __future__ import annotations

import torch

__all__ = ["per_tensor_", "copy_", "mul_", "add_", "sub_", "div_", "pow_", "lerp_", "addcmul_", "addcdiv_", "clamp_min_",
           "clamp_max_", "abs_", "sign_", "exp_", "sigmoid_", "sqrt_", "rsqrt_", "zero_"]


def _flat(xs):
    return getattr(xs, "flat", None)


def _binary(name: str, xs, y, **kw) -> None:
    fx = _flat(xs)
    if fx is not None:
        if isinstance(y, (int, float)):
            getattr(fx, name)(y, **kw)
            return
        fy = _flat(y)
        if fy is not None:
            getattr(fx, name)(fy, **kw)
            return
        if not kw and name in ("mul_", "div_", "add_") and _scalars(y):
            per_tensor_(name, xs, torch.stack(y))  # one value per tensor
            return
    getattr(torch, f"_foreach_{name}")(xs, y, **kw)


def _scalars(y) -> bool:
    """Is ``y`` a list of 0-dim tensors (one value per tensor)?"""
    return isinstance(y, list) and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in y)


def _unary(name: str, xs) -> None:
    fx = _flat(xs)
    if fx is not None:
        getattr(fx, name)()
    else:
        getattr(torch, f"_foreach_{name}")(xs)


def per_tensor_(name: str, xs, values: torch.Tensor) -> None:
    """``x <op>= values[i]`` for the i-th tensor (``name``: "mul_", "div_" or "add_"; ``values``
    a 1-D fp32 tensor): on a FlatList one broadcast operation per run of same-sized tensors,
    else ``torch._foreach_<name>`` with the values' 0-dim views."""
    fx = _flat(xs)
    if fx is None:
        getattr(torch, f"_foreach_{name}")(xs, list(values.unbind(0)))
        return
    for first, end, offset, n in xs.runs:
        getattr(fx[offset:offset + (end - first) * n].view(end - first, n), name)(values[first:end].unsqueeze(1))


def copy_(dst, src) -> None:
    fd, fs = _flat(dst), _flat(src)
    if fd is not None and fs is not None:
        fd.copy_(fs)
    else:
        torch._foreach_copy_(dst, src)


def mul_(xs, y) -> None:
    _binary("mul_", xs, y)


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


def lerp_(xs, ys, weight) -> None:
    fx, fy = _flat(xs), _flat(ys)
    if fx is not None and fy is not None and isinstance(weight, (int, float)):
        fx.lerp_(fy, weight)
    else:
        torch._foreach_lerp_(xs, ys, weight)


def addcmul_(xs, t1, t2, value: float = 1.0) -> None:
    fx, f1, f2 = _flat(xs), _flat(t1), _flat(t2)
    if fx is not None and f1 is not None and f2 is not None:
        fx.addcmul_(f1, f2, value=value)
    else:
        torch._foreach_addcmul_(xs, t1, t2, value=value)


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
