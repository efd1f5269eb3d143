"""Blockwise 8-bit storage for optimizer state, and a range-preserving codec for lr masks.

Pure torch, device-agnostic, no host syncs, no global RNG. Nothing here imports bitsandbytes.

Two blockwise maps share one contract (flatten, blocks of ``block_size`` elements, a power of
two, default 256, the last block may be partial; an fp32 absmax per block, clamped to >= 1e-38;
one uint8/int8 code per element; cost ``1 + 4 / block_size`` bytes per element, 1.016 at 256,
for every tensor however small):

- **float8** (:func:`quantize_float8`, what every optimizer here stores): codes are read off
  the fp32 bit pattern of x / absmax, a float with 4 exponent bits and 3 (signed: momenta) or
  4 (unsigned: sqrt of second moments, lr masks) mantissa bits whose lowest binade continues
  linearly to 0. No table lookups: encoding and decoding are a few elementwise passes. See
  "float8 codec" below.
- **dynamic** (:func:`quantize_blockwise`, the map of the 8-bit-optimizers paper and of
  bitsandbytes): kept to read checkpoints written before the float8 map (:func:`upgrade_dynamic`)
  and for comparisons; its encoder and decoder need table lookups (gathers).

:func:`store` / :func:`load` put either into a state dict (``_f8`` or ``_q8`` suffix).

Dynamic map (legacy; moments: ``exp_avg`` signed, ``exp_avg_sq`` unsigned)
------------------------------------------------------------------------
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
  the distance to the other one, so the dequantised value is unbiased: E[deq(q(x))] = x
  (up to fp32 rounding of the threshold, ~1e-7 of a code gap). A value that is exactly a map
  value (0, the block's absmax, ...) keeps its code. The uniforms are read from a fixed table
  of 2^22 fp32 uniforms (16 MiB per device, built once from a fixed seed): element i of a call
  with integer ``seed`` uses entry ``(offset(seed) + i) mod 2^22``, ``offset`` a 64-bit hash of
  the seed. So the same (seed, input) gives the same codes on every run, on every device type
  (the table is built on CPU and copied), and however the work is split internally; a training
  run resumed from a checkpoint replays bit-exactly if the seed is derived from saved integers
  (use :func:`mix_seed`, e.g. ``mix_seed(base_seed, step, param_index)``). Two seeds give
  windows of the same sequence at different offsets (2^22 streams); elements 2^22 apart in one
  call share a uniform. Neither matters for rounding noise; it is not a general-purpose RNG.

Encoder: the nearest code, or the lower neighbour for stochastic rounding, comes from the fp32
bit pattern of v = x / absmax: one int32 per "cell" of 2^15 consecutive patterns (a relative
width of 2^-8, below the smallest relative gap of either map, so a cell holds at most one code
boundary) gives the code as ``(table[cell] + pattern) >> 15``, exactly ``torch.bucketize`` on
the fp32 map (or midpoints; verified by the tests). Stochastic rounding then adds one when
``v > map[k] + u * gap[k]``; the two values are fetched for two neighbouring codes at once (one
gather per pair of elements). Per element that is two gathers and about a dozen elementwise
passes, run on chunks of 2^18 elements that stay in cache, with no 64-bit index tensors; on
CPU the scratch buffers are kept per thread between calls (< 8 MiB), because allocating them
afresh costs as much in page faults as the work. Decoding reads two values per gather the same
way. ``benchmarks/bench_quant8.py`` (2 threads, 9.44M elements in calls of 2^19) measured
stochastic quantisation at 15-16 ms against 26-27 ms for the previous lookup-table encoder,
nearest 8-9 ms (12-13), decoding 4.3 ms (5.4), the 8-bit log codec 13 ms / 3.7 ms (27 / 5.0);
a single 9.44M call went from ~90 ms to ~15 ms (results/quant8.json; on the shared VM some
runs of the same code were up to 1.5x slower). The gathers (``index_select``) run on one
thread and are about half the cost. Per-call overhead is ~35 us, so many tiny tensors cost
more per element than a few large ones.

Non-finite input: never raises by default. A block holding NaN or +-inf gets a NaN absmax,
so the whole block dequantises to NaN (codes stay valid integers). ``check_finite=True``
raises ``ValueError`` instead (this syncs with the host).

Log codec (per-element learning rates in a known range ``[lo, hi]``, ``0 < lo < hi``)
-------------------------------------------------------------------------------------
``quantize_log`` stores the index of one of ``2**bits`` geometric levels
``lo * (hi/lo)**(c / (2**bits - 1))`` (bits 8: uint8, 1 byte; bits 16: int16, 2 bytes);
``lo`` and ``hi`` are decoded exactly and nothing in the range is flushed to zero (a per-tensor
int8 absmax code flushes everything below hi/254 to 0). Rounding is stochastic by default
(linear-domain probabilities, unbiased; same noise table and seeding as above) so bumps far
smaller than a level gap survive on average; ``"nearest"`` is the closest level in the linear
domain (ties down). NaN maps to ``lo``, values outside ``[lo, hi]`` are clamped. The encoder is
the one above on the clamped value (cells of 2^15 patterns or finer, chosen per range so that a
cell holds at most one level boundary).

Precision: for [1e-7, 1e-3] neighbouring levels differ by 3.7 % at bits=8 and 0.014 % at
bits=16. Stochastic rounding keeps the mean over elements exact but adds per-element noise:
after N requantisations that each move an element by d << gap, the error has a standard
deviation of about sqrt(N * d * gap). With bits=8, lr ~ 5e-4 and d = 2e-6 that is ~25 % of
the value after 500 steps (mean still within 0.2 %); with bits=16 it is ~0.1 %. Use bits=16
for lr masks unless memory is critical (2 bytes like fp16, but no flush to zero and the
same relative resolution over the whole range).

In-place variants
-----------------
``quantize_blockwise(..., codes_out=, absmax_out=)``, ``quantize_log(..., out=)``,
``dequantize_blockwise(..., out=)``, ``dequantize_log(..., out=)`` and ``store(...,
inplace=True)`` / ``store_log(..., inplace=True)`` write into existing tensors, so a call
allocates nothing of the input's size (scratch: see "Encoder" above; on non-CPU devices it
is taken from the caching allocator on every call). Flat, block-aligned fp32 inputs are the
fast case; any shape, dtype and block size works.

State-dict helpers
------------------
:func:`store` / :func:`load` keep a quantised tensor in an ``optimizer.state[p]`` dict as
plain tensors only (safe for ``torch.load(weights_only=True)``):

- ``state[key + "_f8"]`` (float8, the default) or ``state[key + "_q8"]`` (``code="dynamic"``):
  the codes, shaped like the tensor; dtype ``int8`` for a signed map and ``uint8`` for an
  unsigned one (so :func:`load` knows the map from the suffix and the dtype);
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
import sys
import threading
import zlib
from typing import Optional

import torch

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_float8",
    "dequantize_float8",
    "float8_values",
    "prepare_float8",
    "upgrade_dynamic",
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
F8_SUFFIX = "_f8"
ABSMAX_SUFFIX = "_absmax"
LOG_SUFFIX = "_lq"
RANGE_SUFFIX = "_lrange"

# Elements per internal pass: every scratch buffer holds at most this many elements (< 8 MiB
# in all), so the passes over one chunk run in L2/L3 cache. Codes do not depend on it (the
# noise is indexed by the global element position).
_CHUNK = 1 << 18

# The uint16 view of two uint8 codes is c0 + 256 * c1 only on little-endian machines (every
# platform torch supports); elsewhere the one-code-at-a-time path is used.
_PAIRS = sys.byteorder == "little"

_TABLES: dict = {}
_META: dict = {}
_CPU = torch.device("cpu")

_F32_MAX = 3.4028234663852886e38


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _bits32(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", v))[0]


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


# --------------------------------------------------------------------------- code grids
#
# A "grid" is a sorted list of L fp32 code values (the dynamic map, or the levels of the log
# codec). The code of a value v is found from its fp32 bit pattern: Y, a 31-bit integer that
# grows with v inside each cell of 2**shift consecutive patterns, is split into a cell index
# C = (Y >> shift) - base and the position inside the cell. A cell never holds more than one
# code boundary (the builder checks it), so with one int32 per cell
#
#     E[C] = (k0 << shift) + 2**shift - t - (first Y of the cell)
#
# (k0: code at the cell's first pattern, t: position of the boundary in the cell, 2**shift if
# none) the code is  K = (E[C] + Y) >> shift  -- one gather and two integer ops, exact.
#
# Y for the dynamic maps ("xor" mode) is bits ^ (bits >> 31): the pattern itself for v >= 0,
# its complement for v < 0. Both halves of [-2, 2] land in [0, 2**31) without overlap (v >= 0
# below 2**30, v < 0 above) and increase with v, so no offset or clamp is needed. Values with
# |v| >= 2 (and NaN) alias other cells and get some valid code; the blockwise codec never
# produces them (|x / absmax| <= 1; a NaN block decodes to NaN through its absmax). The log
# codec ("raw" mode) clamps x to [lo, hi] first, so Y is the pattern and base the first cell.

_XOR, _RAW = 0, 1


def _pattern_values(y: torch.Tensor, mode: int) -> torch.Tensor:
    """float64 value of each int64 Y (NaN patterns -> +-inf by sign, for counting)."""
    bits = y if mode == _RAW else torch.where(y < (1 << 30), y, ~y)
    v = bits.to(torch.int32).view(torch.float32).double()
    return torch.where(torch.isnan(v), torch.where(bits < 0, -math.inf, math.inf), v)


def _step_table(points: torch.Tensor, strict: bool, mode: int, shift: int, base: int, ncell: int):
    """int32 E (see above) for K = #{p in points: p <= v} (``strict``: p < v); None if a cell
    would hold two boundaries. ``points``: sorted fp32 values."""
    pts = points.double()
    ylo = (torch.arange(ncell, dtype=torch.int64) + base) << shift
    width = 1 << shift

    def count(y):
        return torch.searchsorted(pts, _pattern_values(y, mode), right=not strict)

    k0 = count(ylo)
    d = count(ylo + (width - 1)) - k0
    if int(d.min()) < 0 or int(d.max()) > 1:
        return None
    lo = torch.zeros_like(ylo)  # count(ylo + lo) == k0
    hi = torch.full_like(ylo, width)  # first position with count > k0 is <= hi
    for _ in range(shift + 1):
        mid = (lo + hi) // 2
        up = count(ylo + mid) > k0
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    t = torch.where(d > 0, hi, torch.full_like(hi, width))
    e = (k0 << shift) + width - t - ylo
    # E + Y = (k0 << shift) + 2**shift - t + position, in [0, (k0 + 2) << shift): no int32 overflow
    if int(e.min()) < -(1 << 31) or int(e.max()) >= (1 << 31) or (int(k0.max()) + 2) << shift > (1 << 31):
        return None
    return e.to(torch.int32)


def _pairs64(v: torch.Tensor) -> torch.Tensor:
    """float64 [65536] whose entry c0 + 256 * c1 holds the fp32 pair (v[c0], v[c1])."""
    return torch.stack([v.repeat(256), v.repeat_interleave(256)], 1).contiguous().view(torch.float64).view(-1)


def _build_grid(name: tuple, levels: torch.Tensor, mode: int, shift: int, base: int, ncell: int) -> tuple:
    """Tensors of one grid: (E stochastic, E nearest, values as int32, value pairs, threshold
    base pairs, gap pairs, (threshold base, gap) pairs). Unused entries are empty. Records
    (mode, shift, base, L) in _META. The threshold bases are the values with +inf for the top
    code, which so never rounds up, whatever v."""
    mids = ((levels[:-1].double() + levels[1:].double()) / 2).float()
    e_sr = _step_table(levels[1:], False, mode, shift, base, ncell)
    e_nr = _step_table(mids, True, mode, shift, base, ncell)
    if e_sr is None or e_nr is None:
        raise AssertionError("a grid cell holds two code boundaries")
    gaps = torch.cat([levels[1:] - levels[:-1], levels.new_zeros(1)])
    bases = torch.cat([levels[:-1], levels.new_full((1,), math.inf)])
    n = levels.numel()
    empty = torch.empty(0, dtype=torch.float64)
    if n == 256:
        v2, t2, g2, mg = _pairs64(levels), _pairs64(bases), _pairs64(gaps), empty
    else:
        v2 = t2 = g2 = empty
        mg = torch.stack([bases, gaps], 1).contiguous().view(torch.float64).view(-1)
    _META[name] = (mode, shift, base, n)
    return (e_sr, e_nr, levels.view(torch.int32).clone(), v2, t2, g2, mg)


def _grid(name: tuple, device, build):
    tabs = _cached(name, device, build)
    return _META[name], tabs


def _map_grid(signed: bool, device):
    name = ("grid", bool(signed))
    return _grid(name, device, lambda: _build_grid(name, dynamic_map(signed), _XOR, 15, 0, 1 << 16))


_NOISE_BITS = 22  # 2^22 uniforms (16 MiB) + one chunk of wrap-around, per device, built once


def _noise_table(device) -> torch.Tensor:
    def build():
        gen = torch.Generator().manual_seed(0x5EED)
        t = torch.rand(1 << _NOISE_BITS, generator=gen, dtype=torch.float32)
        return (torch.cat([t, t[:_CHUNK]]),)

    return _cached(("noise", _NOISE_BITS, _CHUNK), device, build)[0]


def _noise_offset(seed: int) -> int:
    """Where the seed's stream starts in the noise table: element i of a call uses entry
    (offset + i) mod 2^22, independent of how the call is split into chunks."""
    return _splitmix64(int(seed) & _MASK64) & ((1 << _NOISE_BITS) - 1)


class _Work:
    """Views of a scratch for chunks of ``n`` elements (``n`` even for 8-bit codes)."""

    __slots__ = ("v", "bits", "head", "tail", "y", "thr", "thr64", "c", "idx", "k", "gap", "gap64", "codes", "step",
                 "p")

    def __init__(self, s: "_Scratch", n: int, wide: bool):
        f32, i32 = torch.float32, torch.int32
        self.v = s.buf("v", f32)[:n]
        self.bits = self.v.view(i32)
        self.head, self.tail = self.v[:n - 1], self.v[n - 1:]  # for an odd chunk padded by one
        self.y = s.buf("y", i32)[:n]
        self.thr = self.y.view(f32)
        self.c = s.buf("c", i32)[:n]
        self.k = s.buf("k", i32)[:n]
        if wide:
            self.p = s.buf("p", torch.float64)[:n]
            self.thr64 = self.gap = self.gap64 = self.idx = self.codes = self.step = None
        else:
            self.p = None
            self.thr64 = self.thr.view(torch.float64)
            self.gap = s.buf("g", f32)[:n]
            self.gap64 = self.gap.view(torch.float64)
            self.idx = self.c[:n // 2]
            self.codes = s.buf("codes", torch.uint8)[:n]
            self.step = s.buf("step", torch.uint8)[:n]


class _Scratch:
    """Flat buffers of ``length`` elements, created on first use and shared by the chunks of a
    call (and, on CPU, by the calls of one thread: see :func:`_scratch`), with their views per
    chunk length."""

    def __init__(self, length: int, device):
        self.length, self.device, self.bufs, self.works = length, device, {}, {}

    def buf(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        b = self.bufs.get(name)
        if b is None:
            b = self.bufs[name] = torch.empty(self.length, dtype=dtype, device=self.device)
        return b

    def work(self, n: int, wide: bool) -> _Work:
        w = self.works.get((n, wide))
        if w is None:
            if len(self.works) >= 64:
                self.works.clear()
            w = self.works[(n, wide)] = _Work(self, n, wide)
        return w


_LOCAL = threading.local()


def _scratch(device: torch.device, n: int) -> _Scratch:
    """Scratch for chunks of up to n elements. On CPU each thread keeps its buffers between
    calls (at most ~8 MiB: five 4-byte, one 8-byte and two 1-byte buffers of 2^18 elements),
    because a fresh large allocation costs page faults on every call, about as much as the
    work itself; other devices get new buffers (their caching allocators already reuse memory)."""
    n = min(max(n + (n & 1), 2), _CHUNK)
    if device.type != "cpu":
        return _Scratch(n, device)
    s = getattr(_LOCAL, "scratch", None)
    if s is None or s.length < n:
        s = _LOCAL.scratch = _Scratch(min(1 << (n - 1).bit_length(), _CHUNK), _CPU)
    return s


def _encode_chunk(w: _Work, meta, tabs, nearest: bool, u, out) -> None:
    """Codes of the fp32 values ``w.v`` (left intact) into ``out`` (uint8 for L == 256, else
    int16 holding code - 32768). ``u``: uniforms for stochastic rounding (same length), None
    for nearest."""
    mode, shift, base, nlev = meta
    y, c, k, bits = w.y, w.c, w.k, w.bits
    if mode == _XOR:
        torch.bitwise_right_shift(bits, 31, out=y)
        src = y.bitwise_xor_(bits)
    else:
        src = bits
    torch.bitwise_right_shift(src, shift, out=c)
    if base:
        c.sub_(base)
    torch.index_select(tabs[1] if nearest else tabs[0], 0, c, out=k)
    k.add_(src)
    if shift:
        k.bitwise_right_shift_(shift)
    # k: nearest code, or the lower neighbour map[k] <= v < map[k + 1] (k = L - 1 at the top).
    # Stochastic: k + 1 iff v > base[k] + u * gap[k] (base = map, +inf for the top code), i.e.
    # with probability (v - map[k]) / gap[k]; never when v == map[k] (the threshold is
    # >= map[k] whatever the rounding, FMA or not). The sign bit of threshold - v is the step.
    thr = w.thr
    if nlev == 256:
        out.copy_(k)
        if nearest:
            return
        if _PAIRS:  # one gather fetches the entries of two neighbouring codes
            _pair_index(w.idx, out)
            torch.index_select(tabs[4], 0, w.idx, out=w.thr64)
            torch.index_select(tabs[5], 0, w.idx, out=w.gap64)
        else:  # entry c of a pair table holds code c's value first
            torch.index_select(tabs[4].view(torch.float32)[0:512:2], 0, k, out=thr)
            torch.index_select(tabs[5].view(torch.float32)[0:512:2], 0, k, out=w.gap)
        thr.addcmul_(u, w.gap).sub_(w.v)
        w.step.copy_(thr.view(torch.int32).bitwise_right_shift_(31))  # 255 where rounding up, else 0
        out.sub_(w.step)  # code - 255 == code + 1 (mod 256)
        return
    if not nearest:
        torch.index_select(tabs[6], 0, k, out=w.p)
        pair = w.p.view(torch.float32).view(-1, 2)
        torch.addcmul(pair[:, 0], u, pair[:, 1], out=thr)
        k.sub_(thr.sub_(w.v).view(torch.int32).bitwise_right_shift_(31))
    out.copy_(k.sub_(1 << 15))


def _check_rounding(rounding: str, seed) -> bool:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs an integer seed (see mix_seed)")
    return rounding == "nearest"


def _run(fill, n: int, device, meta, tabs, nearest: bool, seed, out: torch.Tensor, pad: float) -> None:
    """Encode n values chunk by chunk: ``fill(dst, c0, c1)`` writes the fp32 inputs of
    elements [c0, c1) into ``dst``; codes go to the flat contiguous ``out``."""
    eight = meta[3] == 256
    s = _scratch(device, n)
    noise = None if nearest else _noise_table(device)
    offset = 0 if nearest else _noise_offset(seed)
    aligned = eight and out.storage_offset() % 2 == 0
    for c0 in range(0, n, _CHUNK):
        c1 = min(c0 + _CHUNK, n)
        m = c1 - c0
        odd = eight and m & 1
        w = s.work(m + 1 if odd else m, not eight)
        if odd:
            fill(w.head, c0, c1)
            w.tail.fill_(pad)
        else:
            fill(w.v, c0, c1)
        u = None
        if noise is not None:
            start = (offset + c0) & ((1 << _NOISE_BITS) - 1)
            u = noise[start:start + w.v.numel()]
        dst = out if m == n else out[c0:c1]
        if not eight or (aligned and not odd):
            _encode_chunk(w, meta, tabs, nearest, u, dst)
        else:
            _encode_chunk(w, meta, tabs, nearest, u, w.codes)
            dst.copy_(w.codes[:m])


_U16: dict = {}  # device type -> False once a uint16 -> int32 copy was refused there


def _pair_index(idx: torch.Tensor, codes: torch.Tensor) -> None:
    """idx[i] = codes[2i] + 256 * codes[2i + 1] (int32 idx, uint8 codes, 2-byte aligned)."""
    if _U16.get(idx.device.type, True):
        try:
            idx.copy_(codes.view(torch.uint16))
            return
        except (RuntimeError, TypeError):  # uint16 has limited operator support
            _U16[idx.device.type] = False
    idx.copy_(codes.view(torch.int16)).bitwise_and_(0xFFFF)


_PAIR_MIN = 1 << 14  # below this many codes one gather per code costs less than the setup


def _gather_values(codes_flat: torch.Tensor, tabs, res: torch.Tensor, eight: bool) -> None:
    """res[i] = levels[codes[i]] for flat codes (uint8 for eight, else int32 indices)."""
    n = codes_flat.numel()
    if (eight and _PAIRS and n >= _PAIR_MIN and codes_flat.dtype == torch.uint8 and n % 2 == 0
            and codes_flat.storage_offset() % 2 == 0 and res.storage_offset() % 2 == 0):
        s = _scratch(res.device, n)
        for c0 in range(0, n, _CHUNK):
            c1 = min(c0 + _CHUNK, n)
            idx = s.work(c1 - c0, False).idx
            _pair_index(idx, codes_flat[c0:c1])
            torch.index_select(tabs[3], 0, idx, out=res[c0:c1].view(torch.float64))
        return
    idx = codes_flat if codes_flat.dtype == torch.int32 else codes_flat.to(torch.int32)
    torch.index_select(tabs[2], 0, idx, out=res.view(torch.int32))


def _codes(v: torch.Tensor, signed: bool, nearest: bool, seed: Optional[int] = None) -> torch.Tensor:
    """uint8 codes of already normalised values (flat fp32; the encoder's domain is [-1, 1],
    exact on [-2, 2], any other pattern gets some valid code). For tests and tools."""
    v = v.detach().reshape(-1).float()
    out = torch.empty(v.numel(), dtype=torch.uint8, device=v.device)
    if v.numel():
        meta, tabs = _map_grid(signed, v.device)
        _run(lambda dst, c0, c1: dst.copy_(v[c0:c1]), v.numel(), v.device, meta, tabs, nearest, seed, out, 0.0)
    return out


def _codes_nearest(v: torch.Tensor, signed: bool) -> torch.Tensor:
    return _codes(v, signed, True)


def _codes_stochastic(v: torch.Tensor, signed: bool, seed: int) -> torch.Tensor:
    return _codes(v, signed, False, seed)


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
    out.clamp_(min=ABSMAX_FLOOR).nan_to_num_(nan=math.nan, posinf=math.nan)


def _encode_setup(x, block_size, rounding, seed, absmax_out):
    """Checks and buffers shared by both blockwise encoders: ``(block_size, nearest, flat fp32
    input, flat absmax buffer)``."""
    block_size = _check_block_size(block_size)
    nearest = _check_rounding(rounding, seed)
    flat = (x.detach() if x.requires_grad else x).reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    nb = -(-flat.numel() // block_size)
    if absmax_out is None:
        return block_size, nearest, flat, torch.empty(nb, dtype=torch.float32, device=x.device)
    if absmax_out.dtype != torch.float32 or absmax_out.numel() != nb or not absmax_out.is_contiguous():
        raise ValueError(f"absmax_out must be a contiguous fp32 tensor of {nb} elements")
    return block_size, nearest, flat, absmax_out.view(-1)


def _flat_codes(codes_out: torch.Tensor, n: int) -> torch.Tensor:
    if codes_out.dtype not in (torch.uint8, torch.int8) or codes_out.numel() != n or not codes_out.is_contiguous():
        raise ValueError("codes_out must be a contiguous uint8 or int8 tensor with as many elements as x")
    flat = codes_out.view(-1)
    return flat.view(torch.uint8) if flat.dtype == torch.int8 else flat


def quantize_blockwise(
    x: torch.Tensor,
    signed: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    check_finite: bool = False,
    *,
    codes_out: Optional[torch.Tensor] = None,
    absmax_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` blockwise to the dynamic map.

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x`` and fp32 absmax of shape
    ``[ceil(numel / block_size)]`` on x's device. ``rounding`` is ``"nearest"`` or
    ``"stochastic"`` (then ``seed``, a Python int, is required). Unsigned: negative inputs
    clamp to 0. Any shape, 0-dim and empty tensors included; any floating dtype (computed in
    fp32).

    ``codes_out`` (contiguous uint8 or int8, x's numel) and ``absmax_out`` (contiguous fp32,
    one per block) receive the results in place and are returned as given (so an int8
    ``codes_out`` holds the same bytes as the uint8 codes). They must not overlap ``x``.
    """
    block_size, nearest, flat, absmax = _encode_setup(x, block_size, rounding, seed, absmax_out)
    shape, device, n, nb = x.shape, x.device, flat.numel(), absmax.numel()
    codes = _flat_codes(codes_out, n) if codes_out is not None else torch.empty(n, dtype=torch.uint8, device=device)
    if n == 0:
        return _results(codes, absmax, codes_out, absmax_out, shape)
    if check_finite and not bool(torch.isfinite(flat).all()):
        raise ValueError("quantize_blockwise: input holds NaN or inf")
    full = n // block_size
    body = full * block_size
    early = block_size > _CHUNK  # a block spans several chunks: absmax first
    if early:
        if full:
            _absmax(flat[:body].view(full, block_size), signed, absmax[:full])
        if body < n:
            _absmax(flat[body:].view(1, n - body), signed, absmax[full:])

    def fill(dst, c0, c1):
        if early:  # the chunk lies inside one block
            b = c0 // block_size
            torch.div(flat[c0:c1], absmax[b:b + 1], out=dst)
            return
        b0 = c0 // block_size
        e = min(c1, body)
        k = (e - c0) // block_size if e > c0 else 0
        if k:
            whole = k == nb
            blocks = (flat if whole else flat[c0:e]).view(k, block_size)
            am = absmax if whole else absmax[b0:b0 + k]
            _absmax(blocks, signed, am)
            torch.div(blocks, am.unsqueeze(1), out=(dst if whole else dst[:e - c0]).view(k, block_size))
        if c1 > body:  # the partial last block
            am = absmax[full:]
            _absmax(flat[body:].view(1, n - body), signed, am)
            torch.div(flat[body:], am, out=dst[body - c0:])

    meta, tabs = _map_grid(signed, device)
    _run(fill, n, device, meta, tabs, nearest, seed, codes, 0.0)
    return _results(codes, absmax, codes_out, absmax_out, shape)


def _results(codes, absmax, codes_out, absmax_out, shape):
    """What quantize_blockwise returns: the caller's buffers as given, else the new tensors."""
    return (codes.view(shape) if codes_out is None else codes_out), (absmax if absmax_out is None else absmax_out)


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
    device = codes.device

    def values(res):
        _gather_values(_code_indices(codes), _map_grid(signed, device)[1], res, True)

    return _blockwise_decode(codes, absmax, shape, block_size, out, dtype, values)


def _blockwise_decode(codes, absmax, shape, block_size, out, dtype, values) -> torch.Tensor:
    """Shared by both maps: checks, the fp32 result (``out`` itself when it is fp32), ``values(res)``
    writing each code's map value (a fraction of the block absmax), the per-block scaling."""
    n = codes.numel()
    if shape is None:
        shape = codes.shape
    else:
        shape = torch.Size(shape)
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
        values(res)
        scale = absmax.view(-1) if absmax.is_contiguous() else absmax.reshape(-1)
        if scale.dtype != torch.float32 or scale.device != device:
            scale = scale.to(device=device, dtype=torch.float32)
        full = n // block_size
        body = full * block_size
        if full:
            res[:body].view(full, block_size).mul_(scale[:full].unsqueeze(1))
        if body < n:
            res[body:].mul_(scale[full])
    if direct:
        return out
    if out is not None:
        return out.copy_(res.view(out.shape))
    res = res.view(shape)
    return res if dtype == torch.float32 else res.to(dtype)


def _code_indices(codes: torch.Tensor) -> torch.Tensor:
    """Flat uint8 codes (int8 is a bit-reinterpreted uint8), or int32 indices 0..255 for codes
    stored in another dtype (e.g. cast to float by Optimizer.load_state_dict)."""
    flat = codes.view(-1) if codes.is_contiguous() else codes.reshape(-1)
    dt = flat.dtype
    if dt == torch.uint8:
        return flat
    if dt == torch.int8:
        return flat.view(torch.uint8)
    return flat.to(torch.int32) & 0xFF


# --------------------------------------------------------------------------- float8 codec
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
        return (torch.cat([t, t[:_CHUNK]]),)

    return _cached(("f8noise", m, _CHUNK), device, build)[0]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` blockwise to the float8 map (see "float8 codec" in the module docstring).

    Same contract as :func:`quantize_blockwise`: ``(codes, absmax)``, codes shaped like ``x``
    (int8 when signed, uint8 otherwise, unless ``codes_out`` of the other 8-bit dtype is given),
    fp32 absmax per block, ``"nearest"`` or ``"stochastic"`` rounding (then ``seed`` is
    required; element i uses noise entry ``(offset(seed) + i) mod 2^20``). Unsigned codes store
    |x|. A block holding NaN or inf decodes to NaN.
    """
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
    noise = None if nearest else _f8_noise(m, device)
    offset = 0 if nearest else _splitmix64(int(seed) & _MASK64) & ((1 << _F8_NOISE_BITS) - 1)
    rows = max(_CHUNK // block_size, 1)
    step = rows * block_size
    s = _scratch(device, min(step, n))
    z_all, t_all = s.buf("v", torch.float32), s.buf("y", torch.int32)
    if z_all.numel() < min(step, n):  # a block wider than the scratch
        z_all = torch.empty(min(step, n), dtype=torch.float32, device=device)
        t_all = torch.empty(min(step, n), dtype=torch.int32, device=device)

    def rng(c0, length):
        if noise is None:
            return 1 << (22 - m)
        out, pos = [], c0
        while pos < c0 + length:  # windows of at most one chunk
            start = (offset + pos) & ((1 << _F8_NOISE_BITS) - 1)
            take = min(c0 + length - pos, _CHUNK)
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


# --------------------------------------------------------------------------- log codec


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
) -> torch.Tensor:
    """Codes of a strictly positive tensor on ``2**bits`` geometric levels spanning [lo, hi].

    Returns codes shaped like ``x``: uint8 for bits=8, int16 (code - 32768) for bits=16.
    ``rounding="stochastic"`` (needs ``seed``) picks the level below or above x with
    linear-domain probabilities (unbiased); ``"nearest"`` picks the closer one (ties down).
    NaN -> lo, +inf -> hi, values outside [lo, hi] clamp. ``out`` (contiguous, x's numel, the
    codes' dtype) receives the codes in place and is returned.
    """
    lo, hi = _check_range(lo, hi)
    bits = _check_bits(bits)
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
        _run(fill, n, device, meta, tabs, nearest, seed, codes, lo32)
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


# the zero codes are Python ints known before any step (no tensor read inside step())
_zero_code(True)
_zero_code(False)
