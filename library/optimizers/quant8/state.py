"""Quantised tensors inside an ``optimizer.state[p]`` dict, as plain tensors only (safe for
``torch.load(weights_only=True)``).

- ``state[key + "_f8"]`` (float8, the default) or ``state[key + "_q8"]`` (``code="dynamic"``):
  the codes, shaped like the tensor; ``int8`` for a signed map and ``uint8`` for an unsigned one
  (so :func:`load` knows the map from the suffix and the dtype);
- ``state[key + "_absmax"]``: fp32 ``[ceil(numel / block_size)]``; the block size is recovered
  from the two lengths (``infer_block_size``).

:func:`store_log` / :func:`load_log` (legacy lr masks) use ``state[key + "_lq"]`` and
``state[key + "_lrange"]``, a ``(lo, hi)`` tuple of Python floats.

``store(..., inplace=True)`` / ``store_log(..., inplace=True)`` overwrite the tensors already
stored when dtype, shape and device match (no allocation).

Note: ``torch.optim.Optimizer.load_state_dict`` casts *every* state tensor (uint8 too) to the
parameter's dtype. :func:`load` / :func:`load_log` then raise ``ValueError`` (the map can no longer
be read from the dtype); keep saved dtypes on load (``library/optimizers/engine.py`` does).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._engine import (ABSMAX_FLOOR, ABSMAX_SUFFIX, DEFAULT_BLOCK_SIZE, F8_SUFFIX, LOG_SUFFIX, Q_SUFFIX, RANGE_SUFFIX,
                      _check_block_size, infer_block_size)
from .dynamic import _zero_code, dequantize_blockwise, quantize_blockwise
from .float8 import dequantize_float8, quantize_float8
from .log import dequantize_log, quantize_log
from .seeds import mix_seed



def _codec(code: str):
    if code == "float8":
        return quantize_float8, dequantize_float8, F8_SUFFIX
    if code == "dynamic":
        return quantize_blockwise, dequantize_blockwise, Q_SUFFIX
    raise ValueError(f"code must be 'float8' or 'dynamic', got {code!r}")


def store(
    state: dict,
    key: str,
    x: torch.Tensor,
    *,
    signed: bool,
    seed: Optional[int] = None,
    rounding: str = "stochastic",
    block_size: int = DEFAULT_BLOCK_SIZE,
    inplace: bool = False,
    code: str = "float8",
) -> None:
    """Quantise ``x`` into ``state[key + "_f8"]`` (float8 map; ``code="dynamic"``: the dynamic
    map under ``key + "_q8"``), int8 codes if signed, else uint8, shaped like x, and
    ``state[key + "_absmax"]`` (fp32). A code stored under the other suffix is removed. The
    stochastic stream is ``mix_seed(seed, key)``, so two keys stored with the same seed get
    different streams.

    ``inplace=True`` overwrites the tensors already stored under ``key`` when they have the
    right dtype, shape and device (no allocation; anything holding them sees the new codes),
    and stores new ones otherwise. The codes are the same either way."""
    quantize, _, suffix = _codec(code)
    mixed = None if seed is None else mix_seed(seed, key)
    codes_out = absmax_out = None
    if inplace:
        old_c, old_a = state.get(key + suffix), state.get(key + ABSMAX_SUFFIX)
        nb = -(-x.numel() // _check_block_size(block_size))
        if (isinstance(old_c, torch.Tensor) and isinstance(old_a, torch.Tensor)
                and old_c.dtype == (torch.int8 if signed else torch.uint8) and old_c.shape == x.shape
                and old_c.device == x.device and old_c.is_contiguous()
                and old_a.dtype == torch.float32 and old_a.shape == (nb,) and old_a.device == x.device):
            codes_out, absmax_out = old_c, old_a
    codes, absmax = quantize(x, signed=signed, block_size=block_size, rounding=rounding,
                             seed=mixed, codes_out=codes_out, absmax_out=absmax_out)
    _put(state, key, suffix, codes, absmax, signed)


def store_zeros(state: dict, key: str, shape, *, signed: bool, device=None,
                block_size: int = DEFAULT_BLOCK_SIZE, code: str = "float8") -> None:
    """Store an all-zero tensor of ``shape`` without materialising it in fp32."""
    _, _, suffix = _codec(code)
    block_size = _check_block_size(block_size)
    shape = torch.Size(shape)
    n = math.prod(shape)
    zero_code = _zero_code(signed) if suffix == Q_SUFFIX else 0
    codes = torch.full(shape, zero_code, dtype=torch.uint8, device=device)
    absmax = torch.full((-(-n // block_size),), ABSMAX_FLOOR, dtype=torch.float32, device=device)
    _put(state, key, suffix, codes, absmax, signed)


def _put(state: dict, key: str, suffix: str, codes, absmax, signed: bool) -> None:
    """Codes under ``key + suffix`` (int8 if signed, else uint8) and the absmax; an entry of the
    other map under ``key`` is removed."""
    state.pop(key + (Q_SUFFIX if suffix == F8_SUFFIX else F8_SUFFIX), None)
    want = torch.int8 if signed else torch.uint8
    state[key + suffix] = codes if codes.dtype == want else codes.view(want)
    state[key + ABSMAX_SUFFIX] = absmax


def load(state: dict, key: str, *, out: Optional[torch.Tensor] = None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise what :func:`store` put under ``key`` (shape = the stored codes' shape), with
    the map named by the suffix (``_f8`` float8, ``_q8`` dynamic).

    Signed or unsigned is read from the codes' dtype (int8: signed, uint8: unsigned). Codes
    that a plain ``Optimizer.load_state_dict`` cast to a float dtype cannot tell them apart and
    raise ``ValueError``; keep saved dtypes on load (the engine does).
    """
    suffix = F8_SUFFIX if key + F8_SUFFIX in state else Q_SUFFIX
    dequantize = dequantize_float8 if suffix == F8_SUFFIX else dequantize_blockwise
    codes = state[key + suffix]
    if codes.dtype == torch.int8:
        signed = True
    elif codes.dtype == torch.uint8:
        signed = False
    else:
        raise ValueError(f"state[{key + suffix!r}] has dtype {codes.dtype}: it was cast on load "
                         "(keep saved dtypes in load_state_dict)")
    return dequantize(codes, state[key + ABSMAX_SUFFIX], signed=signed, out=out, dtype=dtype)


def upgrade_dynamic(state: dict) -> int:
    """Re-encode every dynamic-map entry (``*_q8``, written before the float8 map became the
    default) of one parameter's state to float8 with nearest rounding; returns how many."""
    keys = [k[:-len(Q_SUFFIX)] for k, v in state.items()
            if isinstance(k, str) and k.endswith(Q_SUFFIX) and isinstance(v, torch.Tensor)]
    for key in keys:
        signed = state[key + Q_SUFFIX].dtype == torch.int8
        block = infer_block_size(state[key + Q_SUFFIX].numel(), state[key + ABSMAX_SUFFIX].numel())
        x = load(state, key)
        store(state, key, x, signed=signed, rounding="nearest", block_size=block)
    return len(keys)


def store_log(state: dict, key: str, x: torch.Tensor, *, lo: float, hi: float, bits: int = 8,
              seed: Optional[int] = None, rounding: str = "stochastic", inplace: bool = False) -> None:
    """Quantise a positive tensor into ``state[key + "_lq"]`` with the log codec and record
    ``state[key + "_lrange"] = (lo, hi)`` (Python floats); stream ``mix_seed(seed, key)``.
    ``inplace=True``: overwrite the stored codes when dtype, shape and device match."""
    mixed = None if seed is None else mix_seed(seed, key)
    out = None
    old = state.get(key + LOG_SUFFIX)
    if (inplace and isinstance(old, torch.Tensor) and old.dtype == (torch.uint8 if bits == 8 else torch.int16)
            and old.shape == x.shape and old.device == x.device and old.is_contiguous()):
        out = old
    state[key + LOG_SUFFIX] = quantize_log(x, lo, hi, bits=bits, rounding=rounding, seed=mixed, out=out)
    state[key + RANGE_SUFFIX] = (float(lo), float(hi))


def load_log(state: dict, key: str, *, out: Optional[torch.Tensor] = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise what :func:`store_log` put under ``key``, with the range saved next to it."""
    codes = state[key + LOG_SUFFIX]
    lo, hi = state[key + RANGE_SUFFIX]
    if codes.dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"state[{key + LOG_SUFFIX!r}] has dtype {codes.dtype}: it was cast on load "
                         "(keep saved dtypes in load_state_dict)")
    return dequantize_log(codes, lo, hi, out=out, dtype=dtype)


def has_quantized(state: dict, key: str) -> bool:
    """Whether :func:`store` or :func:`store_log` has written ``key`` into ``state``."""
    return key + F8_SUFFIX in state or key + Q_SUFFIX in state or key + LOG_SUFFIX in state


def quant_keys(key: str) -> tuple[str, ...]:
    """Every state key :func:`store` / :func:`store_log` may write for ``key``."""
    return (key + F8_SUFFIX, key + Q_SUFFIX, key + ABSMAX_SUFFIX, key + LOG_SUFFIX, key + RANGE_SUFFIX)


def state_nbytes(state: dict) -> int:
    """Bytes of the tensors of one parameter's state dict, counted as elements x element size (a
    view into an optimizer's shared arena counts its own elements; ``engine.storage_bytes``
    counts whole storages)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
