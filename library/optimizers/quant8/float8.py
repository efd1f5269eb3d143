"""The float8 blockwise codec: what every 8-bit optimizer here stores (momenta signed, sqrt of
second moments and lr masks unsigned). Codes are read off the fp32 bit pattern of x / absmax, a
float with 4 exponent bits and 3 (signed) or 4 (unsigned) mantissa bits whose lowest binade
continues linearly to 0: no table lookups, a few elementwise passes each way.

Contract (shared with the legacy dynamic map): flatten, blocks of ``block_size`` elements (a
power of two, default 256, the last block may be partial); an fp32 absmax per block, clamped to
>= 1e-38; one int8/uint8 code per element; ``1 + 4 / block_size`` bytes per element.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _engine as E
from ._engine import DEFAULT_BLOCK_SIZE, _absmax, _blockwise_decode, _cached, _encode_setup, _flat_codes, _scratch
from .seeds import _MASK64, _splitmix64

#
# Magnitude code c with M mantissa bits (signed: 7-bit magnitude, M = 3; unsigned: 8 bits,
# M = 4) stands for  y(c) = c * 2^-(14 + M)  for c < 2^M  and  2^((c >> M) - 15) *
# (1 + (c mod 2^M) / 2^M)  above: a float with 4 exponent bits whose smallest binade continues
# linearly down to 0. y runs from 0 to TOP = 2 - 2^-M (1.875 / 1.9375); an element decodes to
# sign * y(c) / TOP * absmax, so the block's absmax and 0 are exact codes.
#
# y(c) * 2^-112 is exactly the fp32 number whose bit pattern is  c << (23 - M): exponent
# field e = c >> M, with e = 0 landing on fp32's own subnormals, which are linear in the bit
# pattern. So the encoder computes z = (x / absmax) * C with C = TOP * 2^-112 (exact; a single
# constant per block would underflow for a large absmax) and reads the code off z's bits:
#   stochastic:  c = (bits(z) + r) >> (23 - M),  r uniform on [0, 2^(23 - M))
#   nearest:     c = (bits(z) + 2^(22 - M)) >> (23 - M)          (ties go up)
# Adding r below the kept bits and truncating picks the level above with probability equal to
# the distance from the level below over the gap, also across a binade edge (the carry moves
# into the exponent) and in the linear range, so E[decoded] = x up to the fp32 rounding of z.
# |x / absmax| <= 1 (correctly rounded division), so no code overflows. For a negative z the
# arithmetic shift keeps the sign in the high bits; the low byte is the magnitude code and the
# signed encoder adds 128 where z < 0 (codes are sign-magnitude; int8 storage reads them back
# sign-extended, and masking off the extension gives the fp32 pattern again). The unsigned
# encoder stores |x| the same way. Decoding is four or five elementwise passes written into the
# output (no gathers, no scratch); encoding is five to seven passes per chunk of 2^18 elements
# (cache-resident scratch) plus the block absmax.

_F8_M = {True: 3, False: 4}  # mantissa bits of the signed (7-bit magnitude) and unsigned maps
# z = y * 2^-shift: the top exponent field 2^E - 1 (E = magnitude bits - M) is y's binade 2^0
_F8_SHIFT = {s: 127 - ((1 << ((7 if s else 8) - m)) - 1) for s, m in _F8_M.items()}
_F8_TOP = {s: 2.0 - 2.0 ** -m for s, m in _F8_M.items()}  # the largest y (1.875, 1.9375)
_F8_C = {s: _F8_TOP[s] * 2.0 ** -_F8_SHIFT[s] for s in _F8_M}  # z of the absmax, exact in fp32
_F8_NOISE_BITS = 20  # 2^20 int32 offsets (4 MiB per mantissa width and device), built once


def _f8_noise(m: int, device) -> torch.Tensor:
    """Uniform integers on [0, 2^(23 - m)), 2^20 of them plus one chunk of wrap-around."""
    def build():
        gen = torch.Generator().manual_seed(0x5EED8)
        t = torch.randint(0, 1 << 23, (1 << _F8_NOISE_BITS,), generator=gen, dtype=torch.int32)
        t = t.bitwise_right_shift_(m)
        return (torch.cat([t, t[:E._CHUNK]]),)

    return _cached(("f8noise", m, E._CHUNK), device, build)[0]


def _noise_offset(seed: int) -> int:
    """Where ``seed``'s stream starts in the noise table (element i uses entry offset + i)."""
    return _splitmix64(int(seed) & _MASK64) & ((1 << _F8_NOISE_BITS) - 1)


def segment_noise(signed: bool, segments, total: int, device) -> torch.Tensor:
    """Stochastic-rounding noise for ``total`` flat elements holding several tensors, each with
    its own stream: ``segments`` = ``[(start, length, seed), ...]``; element j of a segment gets
    the noise :func:`quantize_float8` with ``seed`` gives element j of that tensor alone, so a
    chunk encoded at once has the codes of its tensors encoded one by one (padding gets 0)."""
    return E.segment_windows(_f8_noise(_F8_M[bool(signed)], device), _F8_NOISE_BITS,
                             [(a, n, _noise_offset(seed)) for a, n, seed in segments], total)


def prepare_float8(device=None) -> None:
    """Build the float8 codec's noise tables for ``device`` now (they are otherwise built on first
    use, on the host, and copied: optimizers call this at construction so step() never does)."""
    for m in set(_F8_M.values()):
        _f8_noise(m, device)


def float8_values(signed: bool = True, device=None) -> torch.Tensor:
    """The fp32 value of every code as a fraction of the block's absmax (256 entries, indexed
    by the uint8 code; signed codes are sign-magnitude, 128 + c is -value(c); the top code is 1)."""
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    one = torch.ones(1, dtype=torch.float32, device=device)
    return dequantize_float8(codes.view(torch.int8) if signed else codes, one, signed=signed, block_size=256)


def _f8_encode_rows(xb, absmax, codes, z, t, noise, m: int, signed: bool) -> None:
    """Codes of the rows of ``xb`` (fp32 [k, w]) with block absmax ``absmax`` ([k]); ``codes``:
    flat uint8 [k * w]; ``z`` fp32 and ``t`` int32 scratch [k * w]; ``noise``: int32 [k * w]
    or a Python int (nearest)."""
    torch.div(xb, absmax.unsqueeze(1), out=z.view(xb.shape))  # |.| <= 1, exactly 1 at the absmax
    z.mul_(_F8_C[signed])
    zi = z.view(torch.int32)
    if signed:
        torch.bitwise_right_shift(zi, 31, out=t)  # -1 where z < 0
        zi.add_(noise).bitwise_right_shift_(23 - m)
        zi.sub_(t, alpha=128)
    else:
        zi.add_(noise).bitwise_right_shift_(23 - m)
    codes.copy_(zi)


def quantize_float8(
    x: torch.Tensor,
    signed: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    *,
    codes_out: Optional[torch.Tensor] = None,
    absmax_out: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` blockwise to the float8 map (see "float8 codec" in the module docstring).

    Same contract as :func:`quantize_blockwise`: ``(codes, absmax)``, codes shaped like ``x``
    (int8 when signed, uint8 otherwise, unless ``codes_out`` of the other 8-bit dtype is given),
    fp32 absmax per block, ``"nearest"`` or ``"stochastic"`` rounding (then ``seed`` is
    required; element i uses noise entry ``(offset(seed) + i) mod 2^20``). Unsigned codes store
    |x|. A block holding NaN or inf decodes to NaN. ``noise`` (int32, one entry per element, from
    :func:`segment_noise`) replaces the seed's stream for stochastic rounding.
    """
    if noise is not None:
        rounding, seed = "stochastic", 0
    block_size, nearest, flat, absmax = _encode_setup(x, block_size, rounding, seed, absmax_out)
    signed = bool(signed)
    shape, device, n = x.shape, x.device, flat.numel()
    if codes_out is not None:
        codes = _flat_codes(codes_out, n)
    else:
        codes_out = torch.empty(shape, dtype=torch.int8 if signed else torch.uint8, device=device)
        codes = codes_out.view(-1).view(torch.uint8)
    result = codes_out, (absmax if absmax_out is None else absmax_out)
    if n == 0:
        return result
    full = n // block_size
    body = full * block_size
    if full:
        _absmax(flat[:body].view(full, block_size), True, absmax[:full])
    if body < n:
        _absmax(flat[body:].view(1, n - body), True, absmax[full:])
    m = _F8_M[signed]
    given, noise = noise, None if nearest else _f8_noise(m, device)
    offset = 0 if nearest else _noise_offset(seed)
    rows = max(E._CHUNK // block_size, 1)
    step = rows * block_size
    s = _scratch(device, min(step, n))
    z_all, t_all = s.buf("v", torch.float32), s.buf("y", torch.int32)
    if z_all.numel() < min(step, n):  # a block wider than the scratch
        z_all = torch.empty(min(step, n), dtype=torch.float32, device=device)
        t_all = torch.empty(min(step, n), dtype=torch.int32, device=device)

    def rng(c0, length):
        if given is not None:
            return given[c0:c0 + length]
        if noise is None:
            return 1 << (22 - m)
        out, pos = [], c0
        while pos < c0 + length:  # windows of at most one chunk
            start = (offset + pos) & ((1 << _F8_NOISE_BITS) - 1)
            take = min(c0 + length - pos, E._CHUNK)
            out.append(noise[start:start + take])
            pos += take
        return out[0] if len(out) == 1 else torch.cat(out)

    for c0 in range(0, body, step):
        c1 = min(c0 + step, body)
        k, w = (c1 - c0) // block_size, c1 - c0
        _f8_encode_rows(flat[c0:c1].view(k, block_size), absmax[c0 // block_size:c1 // block_size], codes[c0:c1],
                        z_all[:w], t_all[:w], rng(c0, w), m, signed)
    if body < n:
        w = n - body
        _f8_encode_rows(flat[body:].view(1, w), absmax[full:], codes[body:], z_all[:w], t_all[:w], rng(body, w),
                        m, signed)
    return result


def dequantize_float8(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    signed: bool = True,
    shape=None,
    block_size: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_float8` (same contract as :func:`dequantize_blockwise`)."""
    def values(res):
        flat = codes.reshape(-1)
        if flat.dtype not in (torch.uint8, torch.int8):  # e.g. cast to float by a plain load
            flat = flat.to(torch.int32) & 0xFF
        ri = res.view(torch.int32)
        if signed:
            ri.copy_(flat.view(torch.int8) if flat.dtype == torch.uint8 else flat if flat.dtype == torch.int8
                     else (flat ^ 0x80) - 0x80)  # sign-extended
            sh = 23 - _F8_M[True]  # clear the sign extension above the 7 magnitude bits
            ri.bitwise_left_shift_(sh).bitwise_and_(-(1 << 31) | ((1 << (sh + 7)) - 1))
        else:
            ri.copy_(flat.view(torch.uint8) if flat.dtype == torch.int8 else flat)
            ri.bitwise_left_shift_(23 - _F8_M[False])
        res.div_(_F8_C[bool(signed)])  # y / TOP: exactly 1 for the top code

    return _blockwise_decode(codes, absmax, shape, block_size, out, dtype, values)
