"""The machinery the codecs share: fp32 tables built once per device, the table encoder, scratch
buffers, the noise table, and the blockwise plumbing (block sizes, absmax, decoding).

Table encoder (used by the legacy dynamic map and the log codec): the nearest code, or the lower
neighbour for stochastic rounding, comes from the fp32 bit pattern of v = x / absmax: one int32
per "cell" of 2^15 consecutive patterns (a relative width of 2^-8, below the smallest relative
gap of either map, so a cell holds at most one code boundary) gives the code as
``(table[cell] + pattern) >> 15``, exactly ``torch.bucketize`` on the fp32 map (or midpoints;
verified by the tests). Stochastic rounding then adds one when ``v > map[k] + u * gap[k]``; the
two values are fetched for two neighbouring codes at once (one gather per pair of elements).
Per element that is two gathers and about a dozen elementwise passes, run on chunks of 2^18
elements that stay in cache, with no 64-bit index tensors; on CPU the scratch buffers are kept
per thread between calls (< 8 MiB), because allocating them afresh costs as much in page faults
as the work. Decoding reads two values per gather the same way. Timings:
``benchmarks/bench_quant8.py`` and docs/benchmarks.md.

Stochastic rounding reads its uniforms from a fixed table of 2^22 fp32 uniforms (16 MiB per
device, built once from a fixed seed): element i of a call with integer ``seed`` uses entry
``(offset(seed) + i) mod 2^22``, ``offset`` a 64-bit hash of the seed, so the same (seed, input)
gives the same codes on every run, on every device type and however the work is split into
chunks. It is not a general-purpose RNG.

Tests patch ``_CHUNK``, ``_PAIRS`` and ``_U16`` here; the codec modules read them through this
module at call time.
"""
from __future__ import annotations

import math
import struct
import sys
import threading

import torch

from .seeds import _MASK64, _splitmix64

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


def segment_windows(table: torch.Tensor, bits: int, segments, total: int) -> torch.Tensor:
    """Per-element noise for ``total`` flat elements holding several tensors, each with its own
    stream: ``segments`` = ``[(start, length, offset), ...]``; element j of a segment gets
    ``table[(offset + j) mod 2^bits]`` (the entry a single-tensor call with that offset uses), and
    elements outside every segment (padding) get 0. ``table`` holds 2^bits entries plus one chunk
    of wrap-around."""
    mask = (1 << bits) - 1
    pieces, pos = [], 0
    for start, length, offset in segments:
        if start > pos:
            pieces.append(torch.zeros(start - pos, dtype=table.dtype, device=table.device))
        for j in range(0, length, _CHUNK):
            first = (offset + j) & mask
            pieces.append(table[first:first + min(_CHUNK, length - j)])
        pos = start + length
    if total > pos:
        pieces.append(torch.zeros(total - pos, dtype=table.dtype, device=table.device))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def log_segment_noise(segments, total: int, device) -> torch.Tensor:
    """:func:`segment_windows` for the table codecs (log lr masks): ``segments`` carry seeds."""
    return segment_windows(_noise_table(device), _NOISE_BITS,
                           [(a, n, _noise_offset(seed)) for a, n, seed in segments], total)


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


def _run(fill, n: int, device, meta, tabs, nearest: bool, seed, out: torch.Tensor, pad: float,
         given: torch.Tensor | None = None) -> None:
    """Encode n values chunk by chunk: ``fill(dst, c0, c1)`` writes the fp32 inputs of
    elements [c0, c1) into ``dst``; codes go to the flat contiguous ``out``. ``given`` (n + 1
    uniforms, :func:`log_segment_noise`) replaces the seed's stream."""
    eight = meta[3] == 256
    s = _scratch(device, n)
    noise = None if nearest or given is not None else _noise_table(device)
    offset = 0 if noise is None else _noise_offset(seed)
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
        if given is not None:
            u = given[c0:c0 + w.v.numel()]
        elif noise is not None:
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


def _results(codes, absmax, codes_out, absmax_out, shape):
    """What quantize_blockwise returns: the caller's buffers as given, else the new tensors."""
    return (codes.view(shape) if codes_out is None else codes_out), (absmax if absmax_out is None else absmax_out)


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
