"""The dynamic map of the 8-bit-optimizers paper (and of bitsandbytes): legacy. Kept to read
checkpoints written before the float8 map (``state.upgrade_dynamic``) and for comparisons; every
optimizer here stores float8 codes.

``quantize_blockwise`` flattens a tensor into blocks of ``block_size`` elements (a power of
two, default 256, the last block may be partial), stores the fp32 absmax of every block
(clamped to >= 1e-38, so an all-zero block decodes to zeros and a subnormal block is coded,
more coarsely, relative to 1e-38) and, per element, the uint8 index of a value of
:func:`dynamic_map` after dividing by the block's absmax. Cost: ``1 + 4 / block_size`` bytes per
element (1.016 at 256) for every tensor, however small.

Rounding: ``"nearest"`` is the closest map value (ties go to the lower code; an EMA whose
per-step change is below half a code gap never moves: "EMA stall"); ``"stochastic"`` picks one
of the two map values around x with probabilities proportional to the distance to the other, so
E[deq(q(x))] = x (up to fp32 rounding of the threshold, ~1e-7 of a code gap); a value that is
exactly a map value keeps its code. Encoder and noise: ``_engine``. A training run resumed from a
checkpoint replays bit-exactly if the seed is derived from saved integers (``seeds.mix_seed``).

Non-finite input never raises by default: a block holding NaN or +-inf gets a NaN absmax, so the
whole block dequantises to NaN (codes stay valid integers); ``check_finite=True`` raises
``ValueError`` instead (this syncs with the host).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _engine as E
from ._engine import (_XOR, DEFAULT_BLOCK_SIZE, _absmax, _blockwise_decode, _build_grid, _cached, _code_indices,
                      _encode_setup, _flat_codes, _gather_values, _grid, _results, _run)



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


def _map_grid(signed: bool, device):
    name = ("grid", bool(signed))
    return _grid(name, device, lambda: _build_grid(name, dynamic_map(signed), _XOR, 15, 0, 1 << 16))


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
    early = block_size > E._CHUNK  # a block spans several chunks: absmax first
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


# the zero codes are Python ints known before any step (no tensor read inside step())
_zero_code(True)
_zero_code(False)
