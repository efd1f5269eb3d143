"""Blockwise 8-bit storage for optimizer state, and a range-preserving codec for lr masks.

Pure torch, device-agnostic, no host syncs, no global RNG. Written from the published
description of the "dynamic" 8-bit data type (Dettmers et al., 8-bit optimizers); nothing
here imports bitsandbytes.

Blockwise codec (moments: ``exp_avg`` signed, ``exp_avg_sq`` unsigned)
-----------------------------------------------------------------------
``quantize_blockwise`` flattens a tensor into blocks of ``block_size`` elements (a power of
two, default 256, the last block may be partial), stores the fp32 absmax of every block
(clamped to >= 1e-38, so an all-zero block decodes to zeros and a subnormal block is coded,
more coarsely, relative to 1e-38) and, per element, the uint8 index of a value of
:func:`dynamic_map` after dividing by the block's absmax. Cost: ``1 + 4 / block_size`` bytes per element
(1.016 at 256) for every tensor, however small: a tensor shorter than a block is one block.

Rounding:
- ``"nearest"``: the closest map value (ties go to the lower code). An EMA whose per-step
  change is below half a code gap never moves with nearest rounding ("EMA stall").
- ``"stochastic"``: the two map values around x, chosen with probabilities proportional to
  the distance to the other one, so the dequantised value is unbiased: E[deq(q(x))] = x.
  The uniforms come from a ``torch.Generator`` seeded with the caller's integer ``seed``;
  the same (seed, input, device type, torch version) gives the same codes, so a training
  run resumed from a checkpoint replays bit-exactly if the seed is derived from saved
  integers (use :func:`mix_seed`, e.g. ``mix_seed(base_seed, step, param_index)``). CPU and
  CUDA generators differ, so the streams differ between device types.

The nearest code is found with a 2^17-entry lookup table indexed by the top 17 bits of the
fp32 pattern (sign, exponent, 8 mantissa bits) plus one comparison against the only code
boundary that can fall inside that table cell; this is the exact ``bucketize`` result
(verified by the tests) and 7-20x faster than ``torch.bucketize`` on CPU.

Non-finite input: never raises by default. A block holding NaN or +-inf gets a NaN absmax,
so the whole block dequantises to NaN (codes stay valid integers). ``check_finite=True``
raises ``ValueError`` instead (this syncs with the host).

Log codec (per-element learning rates in a known range ``[lo, hi]``, ``0 < lo < hi``)
-------------------------------------------------------------------------------------
``quantize_log`` stores the index of one of ``2**bits`` geometric levels
``lo * (hi/lo)**(c / (2**bits - 1))`` (bits 8: uint8, 1 byte; bits 16: int16, 2 bytes);
``lo`` and ``hi`` are decoded exactly and nothing in the range is flushed to zero (a per-tensor
int8 absmax code flushes everything below hi/254 to 0). Rounding is stochastic by default
(linear-domain probabilities, unbiased) so bumps far smaller than a level gap survive on
average. NaN maps to ``lo``, values outside ``[lo, hi]`` are clamped.

Precision: for [1e-7, 1e-3] neighbouring levels differ by 3.7 % at bits=8 and 0.014 % at
bits=16. Stochastic rounding keeps the mean over elements exact but adds per-element noise:
after N requantisations that each move an element by d << gap, the error has a standard
deviation of about sqrt(N * d * gap). With bits=8, lr ~ 5e-4 and d = 2e-6 that is ~25 % of
the value after 500 steps (mean still within 0.2 %); with bits=16 it is ~0.1 %. Use bits=16
for lr masks unless memory is critical (2 bytes like fp16, but no flush to zero and the
same relative resolution over the whole range).

State-dict helpers
------------------
:func:`store` / :func:`load` keep a quantised tensor in an ``optimizer.state[p]`` dict as
plain tensors only (safe for ``torch.load(weights_only=True)``):

- ``state[key + "_q8"]``: the codes, shaped like the tensor; dtype ``int8`` for the signed
  map and ``uint8`` for the unsigned one (the int8 tensor is the same bytes reinterpreted,
  so :func:`load` knows the map without being told);
- ``state[key + "_absmax"]``: fp32 ``[ceil(numel / block_size)]``; the block size is
  recovered from the two lengths (it is a power of two, see :func:`infer_block_size`).

:func:`store_log` / :func:`load_log` use ``state[key + "_lq"]`` (uint8 or int16 codes) and
``state[key + "_lrange"]``, a ``(lo, hi)`` tuple of Python floats.

Note: ``torch.optim.Optimizer.load_state_dict`` casts *every* state tensor (uint8 too) to
the parameter's dtype. :func:`load` / :func:`load_log` then raise ``ValueError`` (the map
can no longer be read from the dtype); :func:`dequantize_blockwise` and
:func:`dequantize_log` (with ``bits=``) still decode such codes exactly, but an absmax cast
to bf16/fp16 has lost precision. An optimizer should keep saved dtypes on load
(``library/optimizers/engine.py`` does).
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Optional

import torch

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "infer_block_size",
    "log_levels",
    "quantize_log",
    "dequantize_log",
    "mix_seed",
    "store",
    "load",
    "store_zeros",
    "store_log",
    "load_log",
    "has_quantized",
    "quant_keys",
    "state_nbytes",
]

DEFAULT_BLOCK_SIZE = 256
ABSMAX_FLOOR = 1e-38  # clamp before dividing: 1 / 1e-38 is still a finite fp32

Q_SUFFIX = "_q8"
ABSMAX_SUFFIX = "_absmax"
LOG_SUFFIX = "_lq"
RANGE_SUFFIX = "_lrange"

# Lookup-table geometry: cell = top 17 bits of the fp32 pattern (shift by 15), offset so
# negative patterns index from 0. A cell spans a relative width of 2**-8 (0.39 %), below the
# smallest relative gap between neighbouring values of either dynamic map (0.70 %).
_SHIFT = 15
_CELLS = 1 << (32 - _SHIFT)
_OFFSET = _CELLS // 2

_TABLES: dict = {}
_CPU = torch.device("cpu")


def _cached(name: tuple, device, build):
    """Tables built once on CPU (``build()`` -> tuple of tensors), copied once per device."""
    given = _CPU if device is None else device
    val = _TABLES.get((name, given))
    if val is None:
        device = torch.device(given)
        if device.type != "cpu" and device.index is None:
            device = torch.empty(0, device=device).device
        val = _TABLES.get((name, device))
        if val is None:
            cpu_val = _TABLES.get((name, _CPU))
            if cpu_val is None:
                cpu_val = _TABLES[(name, _CPU)] = build()
            val = cpu_val if device == _CPU else tuple(t.to(device) for t in cpu_val)
            _TABLES[(name, device)] = val
        _TABLES[(name, given)] = val
    return val


# --------------------------------------------------------------------------- dynamic map


def _build_dynamic_map(signed: bool) -> tuple:
    vals = [0.0, 1.0]
    for i in range(7):  # decades 1e-6 .. 1e0
        scale = 10.0 ** (i - 6)
        edges = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1.0, edges, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        vals += (mids * scale).tolist()  # fp32 product: bit-identical to bitsandbytes' map
        if signed:
            vals += (mids * -scale).tolist()
    m = torch.tensor(sorted(vals), dtype=torch.float32)
    assert m.numel() == 256 and torch.unique(m).numel() == 256
    return (m,)


_ZERO_CODES: dict = {}


def _zero_code(signed: bool) -> int:
    """Index of 0.0 in the map, computed once per process from the Python-side values."""
    code = _ZERO_CODES.get(bool(signed))
    if code is None:
        values = _build_dynamic_map(bool(signed))[0].tolist()
        code = _ZERO_CODES[bool(signed)] = values.index(0.0)
    return code


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """The 256 sorted fp32 values of the dynamic map (signed: [-0.993, 1], unsigned: [0, 1]).

    Cached per device; do not modify the returned tensor.
    """
    return _cached(("map", bool(signed)), device, lambda: _build_dynamic_map(bool(signed)))[0]


def _cell_bounds():
    """Smallest and largest real value of every lookup cell (NaN cells -> +inf)."""
    start = (torch.arange(_CELLS, dtype=torch.int64) - _OFFSET) << _SHIFT
    end = start + ((1 << _SHIFT) - 1)
    a = start.to(torch.int32).view(torch.float32).double()
    b = end.to(torch.int32).view(torch.float32).double()
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    return lo.nan_to_num(nan=math.inf), hi.nan_to_num(nan=math.inf)


def _build_tables(signed: bool) -> tuple:
    m = dynamic_map(signed).double()
    mids = ((m[:-1] + m[1:]) / 2).float().double()  # the fp32 boundaries used at runtime
    lo, hi = _cell_bounds()
    # nearest: code(v) = #mids < v  (== torch.bucketize(v, mids)); ties go down
    c_lo = torch.bucketize(lo, mids)
    c_hi = torch.bucketize(hi, mids)
    if int((c_hi - c_lo).max()) > 1:
        raise AssertionError("lookup cell holds two code boundaries")
    near_thr = torch.where(c_hi > c_lo, mids[c_lo.clamp(max=254)], torch.full_like(lo, math.inf))
    # stochastic: lower neighbour k(v) = clamp(#codes <= v - 1, 0, 254)
    k_lo = (torch.bucketize(lo, m, right=True) - 1).clamp(0, 254)
    k_hi = (torch.bucketize(hi, m, right=True) - 1).clamp(0, 254)
    if int((k_hi - k_lo).max()) > 1:
        raise AssertionError("lookup cell holds two codes")
    sr_brk = torch.where(k_hi > k_lo, m[(k_lo + 1).clamp(max=255)], torch.full_like(lo, math.inf))
    mf = m.float()
    inv_gap = (1.0 / (mf[1:] - mf[:-1]).double()).float()
    return (
        c_lo.to(torch.uint8),
        near_thr.float(),
        k_lo.to(torch.uint8),
        sr_brk.float(),
        mf,
        inv_gap,
    )


def _tables(signed: bool, device):
    return _cached(("lut", bool(signed)), device, lambda: _build_tables(bool(signed)))


def _cell_index(v: torch.Tensor) -> torch.Tensor:
    """int32 lookup-cell index of a flat contiguous fp32 tensor."""
    idx = v.view(torch.int32) >> _SHIFT
    return idx.add_(_OFFSET)


def _codes_nearest(v: torch.Tensor, signed: bool) -> torch.Tensor:
    """code = table[cell] + (v > the one boundary that may lie in the cell); v flat fp32."""
    near_code, near_thr, *_ = _tables(signed, v.device)
    idx = _cell_index(v)
    codes = near_code.index_select(0, idx)
    codes += v > near_thr.index_select(0, idx)
    return codes


def _generator(seed: int, device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (no global RNG state involved)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


_NOISE_BITS = 22  # a 4M-entry table of uniforms per device (16 MiB), built once from seed 0
_GOLDEN = 0.6180339887498949


def _noise_table(device) -> torch.Tensor:
    def build():
        gen = torch.Generator().manual_seed(0x5EED)
        return (torch.rand(1 << _NOISE_BITS, generator=gen, dtype=torch.float32),)

    return _cached(("noise",), device, build)[0]


def _uniform_(out: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill the flat fp32 ``out`` with uniforms in [0, 1) determined by ``seed``.

    A window of a fixed random table at a seed-dependent offset, shifted by a seed-dependent
    fraction (mod 1): two cheap passes instead of a generator run (about 7x faster on CPU),
    deterministic and reproducible from the integer seed alone. Tensors longer than half the
    table fall back to a seeded ``torch.Generator``.
    """
    n = out.numel()
    table = _noise_table(out.device)
    if n > table.numel() // 2:
        return out.uniform_(generator=_generator(seed, out.device))
    h = _splitmix64(int(seed) & _MASK64)
    offset = h % (table.numel() - n + 1)
    shift = ((h >> 11) * 2.0**-53 + _GOLDEN) % 1.0
    torch.add(table[offset:offset + n], shift, out=out)
    return out.frac_()  # exact for values in [0, 2)


def _codes_stochastic(v: torch.Tensor, signed: bool, seed: int) -> torch.Tensor:
    """Lower neighbour k from the table, then k + (u < p), p = (v - map[k]) / gap[k].

    ``v`` (flat fp32) is overwritten with the uniforms.
    """
    _, _, sr_code, sr_brk, m, inv_gap = _tables(signed, v.device)
    idx = _cell_index(v)
    k = sr_code.index_select(0, idx)
    g1 = sr_brk.index_select(0, idx)
    k += v >= g1
    ki = idx.copy_(k)  # reuse the int32 buffer
    torch.index_select(m, 0, ki, out=g1)
    p = torch.sub(v, g1, out=g1)  # exactly 0 when v is a code value: codes stay put
    p *= inv_gap.index_select(0, ki)
    k += _uniform_(v, seed) < p
    return k


# --------------------------------------------------------------------------- blockwise


def _check_block_size(block_size: int) -> int:
    b = int(block_size)
    if b < 1 or b & (b - 1):
        raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
    return b


def infer_block_size(numel: int, nblocks: int) -> int:
    """The power-of-two block size B with ``ceil(numel / B) == nblocks``.

    Unique when ``nblocks > 1``; with one block (or none) any B >= numel decodes the same, and
    ``max(numel, 1)`` rounded up to a power of two is returned.
    """
    if nblocks <= 1:
        return 1 << max(int(numel) - 1, 0).bit_length()
    b = 1 << (-(-numel // nblocks) - 1).bit_length()
    if -(-numel // b) != nblocks:
        raise ValueError(f"{nblocks} blocks cannot hold {numel} elements with a power-of-two block size")
    return b


def _absmax(blocks: torch.Tensor, signed: bool, out: torch.Tensor) -> None:
    if signed:  # amax and amin separately: much faster than aminmax on CPU
        torch.maximum(blocks.amax(1), blocks.amin(1).neg_(), out=out)
    else:
        torch.amax(blocks, dim=1, out=out)


def quantize_blockwise(
    x: torch.Tensor,
    signed: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` blockwise to the dynamic map.

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x`` and fp32 absmax of shape
    ``[ceil(numel / block_size)]`` on x's device. ``rounding`` is ``"nearest"`` or
    ``"stochastic"`` (then ``seed``, a Python int, is required). Unsigned: negative inputs
    clamp to 0. Any shape, 0-dim and empty tensors included; any floating dtype (computed in
    fp32).
    """
    block_size = _check_block_size(block_size)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs an integer seed (see mix_seed)")
    shape, device = x.shape, x.device
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    n = flat.numel()
    nb = -(-n // block_size)
    if n == 0:
        return (torch.empty(shape, dtype=torch.uint8, device=device),
                torch.empty(0, dtype=torch.float32, device=device))
    if check_finite and not bool(torch.isfinite(flat).all()):
        raise ValueError("quantize_blockwise: input holds NaN or inf")
    full = n // block_size
    body = full * block_size
    absmax = torch.empty(nb, dtype=torch.float32, device=device)
    v = torch.empty(n, dtype=torch.float32, device=device)
    if full:
        blocks = flat[:body].view(full, block_size)
        _absmax(blocks, signed, out=absmax[:full])
    if body < n:
        _absmax(flat[body:].view(1, n - body), signed, out=absmax[full:])
    absmax.clamp_(min=ABSMAX_FLOOR).nan_to_num_(nan=math.nan, posinf=math.nan)
    if full:
        torch.div(blocks, absmax[:full].unsqueeze(1), out=v[:body].view(full, block_size))
    if body < n:
        torch.div(flat[body:], absmax[full:], out=v[body:])
    if rounding == "nearest":
        codes = _codes_nearest(v, signed)
    else:
        codes = _codes_stochastic(v, signed, seed)
    return codes.view(shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    signed: bool = True,
    shape=None,
    block_size: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``map[codes] * absmax[block]``.

    ``shape`` defaults to ``codes.shape``; ``block_size`` defaults to the power of two implied
    by the element and block counts. ``out`` (any float dtype, ``shape`` numel, contiguous)
    receives the result and is returned; otherwise a new ``dtype`` tensor is returned.
    Codes in any integer or float dtype holding the values 0..255 are accepted.
    """
    shape = codes.shape if shape is None else torch.Size(shape)
    n = codes.numel()
    if math.prod(shape) != n:
        raise ValueError(f"shape {tuple(shape)} does not match {n} codes")
    nb = absmax.numel()
    block_size = infer_block_size(n, nb) if block_size is None else _check_block_size(block_size)
    if -(-n // block_size) != nb:
        raise ValueError(f"{nb} absmax values do not fit {n} codes in blocks of {block_size}")
    device = codes.device
    if out is not None and (out.numel() != n or not out.is_contiguous()):
        raise ValueError("out must be contiguous with as many elements as codes")
    direct = out is not None and out.dtype == torch.float32
    res = out.view(-1) if direct else torch.empty(n, dtype=torch.float32, device=device)
    if n:
        table = _cached(("map", bool(signed)), device, lambda: _build_dynamic_map(bool(signed)))[0]
        torch.index_select(table, 0, _as_index(codes), out=res)
        scale = absmax
        if scale.dtype != torch.float32 or scale.device != device:
            scale = scale.to(device=device, dtype=torch.float32)
        full = n // block_size
        body = full * block_size
        if body == n:
            res.view(full, block_size).mul_(scale.unsqueeze(1))
        else:
            if full:
                res[:body].view(full, block_size).mul_(scale[:full].unsqueeze(1))
            res[body:].mul_(scale[full])
    if direct:
        return out
    if out is not None:
        return out.copy_(res.view(out.shape))
    res = res.view(shape)
    return res if dtype == torch.float32 else res.to(dtype)


def _as_index(codes: torch.Tensor) -> torch.Tensor:
    """Flat int32 indices from uint8/int8 codes (int8 is a bit-reinterpreted uint8)."""
    flat = codes.reshape(-1)
    if flat.dtype == torch.int8:
        flat = flat.view(torch.uint8)
    elif flat.dtype != torch.uint8:  # e.g. codes cast to float by Optimizer.load_state_dict
        flat = flat.to(torch.int32)
        return flat & 0xFF
    return flat.to(torch.int32)


# --------------------------------------------------------------------------- log codec


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _check_range(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (0.0 < lo < hi < math.inf):
        raise ValueError(f"need 0 < lo < hi < inf, got lo={lo}, hi={hi}")
    if _f32(lo) == _f32(hi):
        raise ValueError("lo and hi round to the same fp32 value")
    return lo, hi


def _check_bits(bits: int) -> int:
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    return bits


def _build_levels(lo: float, hi: float, bits: int) -> tuple:
    """(levels, levels shifted down by one, 1 / gap); the last two padded so index L-1 is valid."""
    levels_n = 1 << bits
    c = torch.arange(levels_n, dtype=torch.float64)
    lv = (math.log(lo) + c * ((math.log(hi) - math.log(lo)) / (levels_n - 1))).exp().float()
    lv[0], lv[-1] = lo, hi  # exact endpoints (fp32-rounded lo and hi)
    lv = torch.cummax(lv, 0).values  # monotone even if fp32 rounding merged neighbours
    gap = (lv[1:] - lv[:-1]).double()
    inv_gap = torch.where(gap > 0, 1.0 / gap, torch.zeros_like(gap)).float()
    inv_gap = torch.cat([inv_gap, inv_gap.new_zeros(1)])  # top level: p = 0, stays at hi
    upper = torch.cat([lv[1:], lv.new_full((1,), math.inf)])
    return lv, upper, inv_gap


def log_levels(lo: float, hi: float, bits: int = 8, device=None) -> torch.Tensor:
    """The ``2**bits`` fp32 geometric levels of the log codec (first == lo, last == hi)."""
    lo, hi = _check_range(lo, hi)
    bits = _check_bits(bits)
    return _cached(("log", lo, hi, bits), device, lambda: _build_levels(lo, hi, bits))[0]


def quantize_log(
    x: torch.Tensor,
    lo: float,
    hi: float,
    bits: int = 8,
    rounding: str = "stochastic",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Codes of a strictly positive tensor on ``2**bits`` geometric levels spanning [lo, hi].

    Returns codes shaped like ``x``: uint8 for bits=8, int16 (code - 32768) for bits=16.
    ``rounding="stochastic"`` (needs ``seed``) picks the level below or above x with
    linear-domain probabilities (unbiased); ``"nearest"`` picks the closer one (ties down).
    NaN -> lo, +inf -> hi, values outside [lo, hi] clamp.
    """
    lo, hi = _check_range(lo, hi)
    bits = _check_bits(bits)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs an integer seed (see mix_seed)")
    levels_n = 1 << bits
    device = x.device
    lv, upper, inv_gap = _cached(("log", lo, hi, bits), device, lambda: _build_levels(lo, hi, bits))
    xf = x.detach().reshape(-1).to(torch.float32)
    xf = torch.nan_to_num(xf, nan=lo, posinf=hi, neginf=lo).clamp_(lo, hi)
    # level index from the log, biased down by 0.25 (fp32 log error is < 0.01 levels even at
    # 16 bits) so the guess is the true lower level or the one below; one comparison fixes it
    scale = (levels_n - 1) / (math.log(hi) - math.log(lo))
    t = torch.log(xf).mul_(scale).sub_(math.log(lo) * scale + 0.25)
    k = t.floor_().clamp_(min=0).to(torch.int32)
    k += xf >= upper.index_select(0, k)
    p = torch.sub(xf, lv.index_select(0, k)).mul_(inv_gap.index_select(0, k))  # 0 on a level
    if rounding == "nearest":
        k += p > 0.5
    else:
        k += _uniform_(torch.empty(xf.numel(), device=device), seed) < p
    if bits == 8:
        codes = k.to(torch.uint8)
    else:
        codes = k.sub_(1 << 15).to(torch.int16)
    return codes.view(x.shape)


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
    lv = _cached(("log", lo, hi, bits), codes.device, lambda: _build_levels(lo, hi, bits))[0]
    idx = codes.reshape(-1).to(torch.int32)
    if bits == 16:
        idx = (idx + (1 << 15)) & 0xFFFF
    if out is not None:
        if out.numel() != codes.numel() or not out.is_contiguous():
            raise ValueError("out must be contiguous with as many elements as codes")
        if out.dtype == torch.float32:
            torch.index_select(lv, 0, idx, out=out.view(-1))
            return out
        return out.copy_(lv.index_select(0, idx).view(out.shape))
    res = lv.index_select(0, idx).view(codes.shape)
    return res if dtype == torch.float32 else res.to(dtype)


# --------------------------------------------------------------------------- seeds


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts) -> int:
    """Deterministic 63-bit seed from ints and strings (strings via CRC32, not ``hash()``,
    which is salted per process). ``mix_seed(base_seed, step, param_index, "exp_avg")``."""
    h = 0x6A09E667F3BCC908
    for part in parts:
        if isinstance(part, str):
            part = zlib.crc32(part.encode("utf-8"))
        elif isinstance(part, torch.Tensor):
            raise TypeError("mix_seed takes Python ints (a tensor would force a host sync)")
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


# --------------------------------------------------------------------------- state dicts


def store(
    state: dict,
    key: str,
    x: torch.Tensor,
    *,
    signed: bool,
    seed: Optional[int] = None,
    rounding: str = "stochastic",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """Quantise ``x`` into ``state[key + "_q8"]`` (int8 codes if signed, else uint8; shaped
    like x) and ``state[key + "_absmax"]`` (fp32). The stochastic stream is
    ``mix_seed(seed, key)``, so two keys stored with the same seed get different streams."""
    mixed = None if seed is None else mix_seed(seed, key)
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block_size,
                                       rounding=rounding, seed=mixed)
    state[key + Q_SUFFIX] = codes.view(torch.int8) if signed else codes
    state[key + ABSMAX_SUFFIX] = absmax


def store_zeros(state: dict, key: str, shape, *, signed: bool, device=None,
                block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Store an all-zero tensor of ``shape`` without materialising it in fp32."""
    block_size = _check_block_size(block_size)
    shape = torch.Size(shape)
    n = math.prod(shape)
    zero_code = _zero_code(signed)
    codes = torch.full(shape, zero_code, dtype=torch.uint8, device=device)
    state[key + Q_SUFFIX] = codes.view(torch.int8) if signed else codes
    state[key + ABSMAX_SUFFIX] = torch.full((-(-n // block_size),), ABSMAX_FLOOR,
                                            dtype=torch.float32, device=device)


def load(state: dict, key: str, *, out: Optional[torch.Tensor] = None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise what :func:`store` put under ``key`` (shape = the stored codes' shape).

    The map is read from the codes' dtype (int8: signed, uint8: unsigned). Codes that a plain
    ``Optimizer.load_state_dict`` cast to a float dtype cannot tell the map apart and raise
    ``ValueError``; keep saved dtypes on load (the engine does).
    """
    codes = state[key + Q_SUFFIX]
    if codes.dtype == torch.int8:
        signed = True
    elif codes.dtype == torch.uint8:
        signed = False
    else:
        raise ValueError(f"state[{key + Q_SUFFIX!r}] has dtype {codes.dtype}: it was cast on load "
                         "(keep saved dtypes in load_state_dict)")
    return dequantize_blockwise(codes, state[key + ABSMAX_SUFFIX], signed=signed,
                                out=out, dtype=dtype)


def store_log(state: dict, key: str, x: torch.Tensor, *, lo: float, hi: float, bits: int = 8,
              seed: Optional[int] = None, rounding: str = "stochastic") -> None:
    """Quantise a positive tensor into ``state[key + "_lq"]`` with the log codec and record
    ``state[key + "_lrange"] = (lo, hi)`` (Python floats); stream ``mix_seed(seed, key)``."""
    mixed = None if seed is None else mix_seed(seed, key)
    state[key + LOG_SUFFIX] = quantize_log(x, lo, hi, bits=bits, rounding=rounding, seed=mixed)
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
    return key + Q_SUFFIX in state or key + LOG_SUFFIX in state


def quant_keys(key: str) -> tuple[str, ...]:
    """Every state key :func:`store` / :func:`store_log` may write for ``key``."""
    return (key + Q_SUFFIX, key + ABSMAX_SUFFIX, key + LOG_SUFFIX, key + RANGE_SUFFIX)


def state_nbytes(state: dict) -> int:
    """Bytes held by the tensors of one parameter's state dict (storage actually used)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


# the zero codes are Python ints known before any step (no tensor read inside step())
_zero_code(True)
_zero_code(False)
