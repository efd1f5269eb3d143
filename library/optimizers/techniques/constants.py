"""Small device tensors built from Python numbers without a host-to-device copy per step.

On a GPU, ``torch.tensor(python_list, device="cuda")`` copies from pageable host memory and waits
for the device's queue: a host sync in the middle of ``step()``. The vectors a step needs are of
two kinds:

- **layout constants**, a function of the tensors' sizes or positions alone (``sqrt(numel)``, an
  index of partners, fixed weights): :func:`constant` makes each once per (key, device) and keeps
  it in a small process-wide LRU cache, so only a layout's first step copies (a chunk's
  FlatList also keeps the ones it uses: ``ops.cached_vector``);
- **per-step values** drawn from a few distinct numbers (a weight decay per parameter type at
  this step's schedule): :func:`fill_vector` writes each distinct number into its positions with
  ``index_fill_`` (the number travels as a kernel argument, not as a copy), the positions being a
  layout constant.

Both give the bits ``torch.tensor(values, dtype=dtype)`` would (the same rounding to ``dtype``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

__all__ = ["constant", "size_vector", "numels", "sqrt_numels", "index_vector", "fill_vector"]

_CACHE: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 512  # layouts x kinds alive at once; a few KiB of device memory at most


def constant(key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` once per ``key`` (which must name everything the tensor depends on, device and
    dtype included); later calls return the same tensor. Callers must not modify it."""
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = make()
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def size_vector(xs: Sequence[torch.Tensor], tag: str, value: Callable[[int], float], dtype: torch.dtype,
                device) -> torch.Tensor:
    """``[value(x.numel()) for x in xs]`` as a vector on ``device``, made once per sequence of sizes."""
    sizes = tuple(x.numel() for x in xs)
    return constant(("size", tag, sizes, dtype, torch.device(device)),
                    lambda: torch.tensor([value(n) for n in sizes], dtype=dtype, device=device))


def numels(xs: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """``max(numel, 1)`` per tensor (the one definition every caller shares: the cache key is the tag)."""
    return size_vector(xs, "numel", lambda n: float(max(n, 1)), dtype, device)


def sqrt_numels(xs: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """``sqrt(max(numel, 1))`` per tensor."""
    return size_vector(xs, "sqrt_numel", lambda n: math.sqrt(max(n, 1)), dtype, device)


def index_vector(indices: Sequence[int], device) -> torch.Tensor:
    """``indices`` as a long vector on ``device``, made once per sequence."""
    key = tuple(indices)
    return constant(("index", key, torch.device(device)), lambda: torch.tensor(key, dtype=torch.long, device=device))


def fill_vector(values: Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` as a new vector on ``device``: one ``index_fill_`` per distinct value, the
    positions of each a layout constant (a handful of launches, no copy)."""
    distinct: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        distinct.setdefault(float(v), []).append(i)
    out = torch.empty(len(values), dtype=dtype, device=device)
    if len(distinct) == 1:
        return out.fill_(next(iter(distinct)))
    for v, where in distinct.items():
        out.index_fill_(0, index_vector(where, device), v)
    return out
