"""The log codec (legacy): per-element learning rates in a known range ``[lo, hi]``, ``0 < lo < hi``.
Kept to read lr masks saved before the float8 store (AdaptiveHinaAdamW upgrades them on load).

``quantize_log`` stores the index of one of ``2**bits`` geometric levels
``lo * (hi/lo)**(c / (2**bits - 1))`` (bits 8: uint8, 1 byte; bits 16: int16, 2 bytes); ``lo``
and ``hi`` are decoded exactly and nothing in the range is flushed to zero. Rounding is
stochastic by default (linear-domain probabilities, unbiased; the noise table and seeding of
``_engine``) so bumps far smaller than a level gap survive on average; ``"nearest"`` is the
closest level in the linear domain (ties down). NaN maps to ``lo``, values outside ``[lo, hi]``
are clamped. The encoder is the table encoder of ``_engine`` on the clamped value (cells of 2^15
patterns or finer, chosen per range so that a cell holds at most one level boundary).

Precision: for [1e-7, 1e-3] neighbouring levels differ by 3.7 % at bits=8 and 0.014 % at
bits=16. Stochastic rounding keeps the mean over elements exact but adds per-element noise:
after N requantisations that each move an element by d << gap, the error has a standard
deviation of about sqrt(N * d * gap).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._engine import _F32_MAX, _RAW, _bits32, _build_grid, _check_rounding, _f32, _gather_values, _grid, _run



def _check_range(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (0.0 < lo < hi < math.inf):
        raise ValueError(f"need 0 < lo < hi < inf, got lo={lo}, hi={hi}")
    if hi > _F32_MAX or _f32(lo) == 0.0:
        raise ValueError(f"lo={lo} and hi={hi} must be positive finite fp32 values")
    if _f32(lo) == _f32(hi):
        raise ValueError("lo and hi round to the same fp32 value")
    return lo, hi


def _check_bits(bits: int) -> int:
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    return bits


def _build_levels(lo: float, hi: float, bits: int) -> torch.Tensor:
    levels_n = 1 << bits
    c = torch.arange(levels_n, dtype=torch.float64)
    lv = (math.log(lo) + c * ((math.log(hi) - math.log(lo)) / (levels_n - 1))).exp().float()
    lv[0], lv[-1] = lo, hi  # exact endpoints (fp32-rounded lo and hi)
    return torch.cummax(lv, 0).values  # monotone even if fp32 rounding merged neighbours


def _build_log_grid(name: tuple, lo: float, hi: float, bits: int) -> tuple:
    """Grid over [lo, hi] in raw mode with the widest cells (largest shift) that hold at most
    one boundary each: 15 bits for 8-bit codes over a range wider than ~2.7x."""
    lv = _build_levels(lo, hi, bits)
    a, b = _bits32(float(lv[0])), _bits32(float(lv[-1]))
    for shift in range(15 if bits == 8 else 14, -1, -1):
        base = a >> shift if (b >> shift) >= (1 << 17) else 0  # a table from cell 0 saves a pass
        ncell = (b >> shift) - base + 1
        try:
            return _build_grid(name, lv, _RAW, shift, base, ncell)
        except AssertionError:
            continue
    raise AssertionError("no grid for the log levels")  # unreachable: shift 0 cells are single patterns


def _log_grid(lo: float, hi: float, bits: int, device):
    name = ("log", lo, hi, bits)
    return _grid(name, device, lambda: _build_log_grid(name, lo, hi, bits))


def log_levels(lo: float, hi: float, bits: int = 8, device=None) -> torch.Tensor:
    """The ``2**bits`` fp32 geometric levels of the log codec (first == lo, last == hi)."""
    lo, hi = _check_range(lo, hi)
    bits = _check_bits(bits)
    _, tabs = _log_grid(lo, hi, bits, device)
    return tabs[2].view(torch.float32)


def quantize_log(
    x: torch.Tensor,
    lo: float,
    hi: float,
    bits: int = 8,
    rounding: str = "stochastic",
    seed: Optional[int] = None,
    *,
    out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Codes of a strictly positive tensor on ``2**bits`` geometric levels spanning [lo, hi].

    Returns codes shaped like ``x``: uint8 for bits=8, int16 (code - 32768) for bits=16.
    ``rounding="stochastic"`` (needs ``seed``) picks the level below or above x with
    linear-domain probabilities (unbiased); ``"nearest"`` picks the closer one (ties down).
    NaN -> lo, +inf -> hi, values outside [lo, hi] clamp. ``out`` (contiguous, x's numel, the
    codes' dtype) receives the codes in place and is returned. ``noise`` (``numel + 1`` uniforms
    from ``_engine.log_segment_noise``) replaces the seed's stream: a chunk of tensors encoded at
    once then gets the codes of each tensor encoded alone with its own seed.
    """
    lo, hi = _check_range(lo, hi)
    bits = _check_bits(bits)
    if noise is not None:
        rounding, seed = "stochastic", 0
    nearest = _check_rounding(rounding, seed)
    device = x.device
    code_dtype = torch.uint8 if bits == 8 else torch.int16
    n = x.numel()
    if out is not None:
        if out.dtype != code_dtype or out.numel() != n or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {code_dtype} tensor with as many elements as x")
        codes = out.view(-1)
    else:
        codes = torch.empty(n, dtype=code_dtype, device=device)
    if n:
        flat = x.detach().reshape(-1)
        lo32, hi32 = _f32(lo), _f32(hi)

        def fill(dst, c0, c1):
            if flat.dtype == torch.float32:
                torch.clamp(flat[c0:c1], lo32, hi32, out=dst)  # +-inf clamp too; NaN stays NaN
            else:  # clamp in fp32: lo/hi rounded to a narrower dtype could fall outside the grid
                dst.copy_(flat[c0:c1]).clamp_(lo32, hi32)
            dst.nan_to_num_(nan=lo32)

        meta, tabs = _log_grid(lo, hi, bits, device)
        _run(fill, n, device, meta, tabs, nearest, seed, codes, lo32, noise)
    return out if out is not None else codes.view(x.shape)


def dequantize_log(
    codes: torch.Tensor,
    lo: float,
    hi: float,
    bits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of :func:`quantize_log` codes; ``bits`` is inferred from the dtype (uint8 -> 8,
    int16 -> 16) unless given (needed for codes cast to float by a state-dict load)."""
    if bits is None:
        if codes.dtype == torch.uint8:
            bits = 8
        elif codes.dtype == torch.int16:
            bits = 16
        else:
            raise ValueError(f"cannot infer bits from codes of dtype {codes.dtype}; pass bits=")
    lo, hi = _check_range(lo, hi)
    bits = _check_bits(bits)
    n = codes.numel()
    if out is not None and (out.numel() != n or not out.is_contiguous()):
        raise ValueError("out must be contiguous with as many elements as codes")
    direct = out is not None and out.dtype == torch.float32
    res = out.view(-1) if direct else torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        _, tabs = _log_grid(lo, hi, bits, codes.device)
        flat = codes.reshape(-1)
        if bits == 8:
            idx = flat if flat.dtype == torch.uint8 else flat.to(torch.int32) & 0xFF
        elif flat.dtype == torch.int16:
            idx = flat.to(torch.int32).add_(1 << 15)
        else:
            idx = (flat.to(torch.int32) + (1 << 15)) & 0xFFFF
        _gather_values(idx, tabs, res, bits == 8)
    if direct:
        return out
    if out is not None:
        return out.copy_(res.view(out.shape))
    res = res.view(codes.shape)
    return res if dtype == torch.float32 else res.to(dtype)
