"""Tests for library/optimizers/quant8/ (blockwise 8-bit state store and the legacy codecs)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from library.optimizers import quant8 as q

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _blocks_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element absmax of its block (reference, loop-free)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // block)
    pad = torch.nn.functional.pad(flat, (0, nb * block - n)).view(nb, block)
    am = pad.abs().amax(1).clamp(min=q.ABSMAX_FLOOR)
    return am.repeat_interleave(block)[:n]


def _nearest_bound(x: torch.Tensor, signed: bool, block: int) -> torch.Tensor:
    """0.5 * local code gap * absmax (+ distance to the map's range, + fp32 slack)."""
    m = q.dynamic_map(signed)
    am = _blocks_absmax(x, block)
    v = (x.reshape(-1).float() / am)
    vc = v.clamp(float(m[0]), float(m[-1]))
    k = (torch.bucketize(vc, m, right=True) - 1).clamp(0, 254)
    gap = m[k + 1] - m[k]
    return (0.5 * gap + (v - vc).abs()) * am + 1e-6 * am


# --------------------------------------------------------------------------- the map


@pytest.mark.parametrize("signed", [True, False])
def test_map_properties(signed):
    m = q.dynamic_map(signed)
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert torch.unique(m).numel() == 256
    assert bool((m[1:] > m[:-1]).all()), "strictly increasing"
    assert float(m[-1]) == 1.0 and bool((m == 0).any())
    nz = m[m != 0].abs()
    if signed:
        assert float(m[0]) == pytest.approx(-0.99297, abs=1e-4)
        assert float(nz.min()) == pytest.approx(5.5e-7, rel=1e-3)
        assert int((m < 0).sum()) == 127 and int((m > 0).sum()) == 128
    else:
        assert float(m[0]) == 0.0 and not bool((m < 0).any())
        assert float(nz.min()) == pytest.approx(3.25e-7, rel=1e-3)
    assert q.dynamic_map(signed) is m, "cached"


@pytest.mark.parametrize("signed", [True, False])
def test_map_identical_to_bitsandbytes(signed):
    F = _bnb()
    assert torch.equal(q.dynamic_map(signed), F.create_dynamic_map(signed))


def _domain_patterns(g, n):
    """fp32 values with |v| < 2 spread over every binade: random sign and 30-bit magnitude."""
    mag = torch.randint(0, 1 << 30, (n,), generator=g, dtype=torch.int64)
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << 31
    return (mag | sign).to(torch.int32).view(torch.float32)  # the int64 -> int32 cast wraps


def _cell_edges():
    """First and last pattern of every encoder cell (2^15 patterns of v >= 0 or of v < 0)."""
    y = torch.arange(1 << 16, dtype=torch.int64) << 15
    y = torch.cat([y, y + (1 << 15) - 1])
    bits = torch.where(y < (1 << 30), y, ~y).to(torch.int32)
    return bits.view(torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_encoder_equals_bucketize(signed):
    """On the encoder's domain (-2, 2), which holds every x / absmax, the nearest code is exactly
    torch.bucketize on the fp32 midpoints, and the stochastic path only ever picks the two
    neighbours around the value and keeps exact map values on their code. Checked on every map
    value and midpoint and their fp32 neighbours, both edges of every table cell, and random
    patterns from every binade."""
    m = q.dynamic_map(signed)
    mids = (m[1:] + m[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    adversarial = torch.cat([
        m, mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
        torch.nextafter(mids, torch.full_like(mids, -2.0)),
        torch.nextafter(m, torch.full_like(m, 2.0)), torch.nextafter(m, torch.full_like(m, -2.0)),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1e-45, -1e-45, 1.0000001, 1.9999999, -1.9999999]),
    ])
    rand = torch.cat([
        torch.rand(50_000, generator=g) * 2 - 1,
        torch.randn(50_000, generator=g).mul(-8).exp2() * torch.randn(50_000, generator=g).sign(),
    ])
    rand = rand[rand.abs() < 2]
    v = torch.cat([adversarial, rand, _cell_edges(), _domain_patterns(g, 300_001)]).contiguous()
    assert bool((v.abs() < 2).all())
    got = q._codes_nearest(v.clone(), signed)
    assert got.dtype == torch.uint8 and got.shape == v.shape
    assert torch.equal(got.long(), torch.bucketize(v, mids))
    k = (torch.bucketize(v, m, right=True) - 1).clamp(0, 254)
    for seed in (3, 4):
        sr = q._codes_stochastic(v.clone(), signed, seed=seed).long()
        assert bool(((sr == k) | (sr == k + 1)).all())
        on_code = torch.isin(v, m)
        assert torch.equal(sr[on_code], torch.bucketize(v[on_code], m)), "exact codes stay put"
        inside = ~on_code & (v > m[0]) & (v < m[-1])
        ki = k[inside]
        p = ((v[inside].double() - m[ki].double()) / (m[ki + 1].double() - m[ki].double()))
        up = (sr[inside] == ki + 1).double()
        assert abs(float(up.mean() - p.mean())) < 0.01, "rounds up with probability p on average"
    # outside the domain (never produced by quantize_blockwise): valid codes, no error
    bits = torch.randint(-2**31, 2**31 - 1, (100_000,), generator=g, dtype=torch.int64).to(torch.int32)
    wild = torch.cat([bits.view(torch.float32), torch.tensor([2.0, -2.0, 3e38, -3e38, math.inf, -math.inf, math.nan])])
    assert q._codes_nearest(wild, signed).numel() == wild.numel()
    assert q._codes_stochastic(wild, signed, seed=1).numel() == wild.numel()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block", [64, 256, 2048])
def test_roundtrip_error_nearest(signed, block):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 129, generator=g) * torch.randn(37, 1, generator=g).exp()
    x[3, :50] *= 1e-4  # small values next to big ones in one block
    if not signed:
        x = x.square()
    codes, absmax = q.quantize_blockwise(x, signed, block_size=block)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-x.numel() // block),)
    y = q.dequantize_blockwise(codes, absmax, signed)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x).abs().reshape(-1)
    assert bool((err <= _nearest_bound(x, signed, block)).all())
    # nearest really is nearest: no other code is closer
    m = q.dynamic_map(signed)
    am = _blocks_absmax(x, block)
    c = codes.reshape(-1).long()
    for d in (-1, 1):
        other = (m[(c + d).clamp(0, 255)] * am - x.reshape(-1)).abs()
        assert bool((err <= other * (1 + 1e-6) + 1e-12).all())


def test_signed_negative_extreme_and_unsigned_negatives():
    x = torch.tensor([-1.0, 1.0, 0.5, -0.5])
    c, a = q.quantize_blockwise(x, True)
    y = q.dequantize_blockwise(c, a, True)
    assert float(y[1]) == 1.0 and float(y[0]) == pytest.approx(-0.99297, abs=1e-4)
    c, a = q.quantize_blockwise(torch.tensor([-3.0, 2.0, 0.0]), False)
    y = q.dequantize_blockwise(c, a, False)
    assert y.tolist() == [0.0, 2.0, 0.0], "unsigned: negatives clamp to 0"


@pytest.mark.parametrize("signed", [True, False])
def test_extreme_magnitudes(signed):
    """Subnormal blocks (absmax below the 1e-38 floor, quantised relative to the floor, so
    more coarsely) and blocks near fp32 max stay finite and within 2 % of max(absmax, 1e-38)."""
    tiny = torch.tensor([1e-40, 3e-41, 0.0, 7e-42])
    huge = torch.tensor([3e38, 1e38, 0.0, 2e30])
    for x in (tiny, huge, -tiny, -huge):
        xx = x if signed else x.abs()
        for rounding in ("nearest", "stochastic"):
            c, a = q.quantize_blockwise(xx, signed, rounding=rounding, seed=0)
            y = q.dequantize_blockwise(c, a, signed)
            assert bool(torch.isfinite(y).all())
            assert bool(((y - xx).abs() <= 0.02 * max(float(xx.abs().max()), q.ABSMAX_FLOOR)).all())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (255,), (256,), (257,), (2, 3, 129), (1000,)])
def test_shapes_and_zeros(signed, rounding, shape):
    seed = 5 if rounding == "stochastic" else None
    for fill in (0.0, 1.5):
        x = torch.full(shape, fill)
        codes, absmax = q.quantize_blockwise(x, signed, rounding=rounding, seed=seed)
        n = x.numel()
        assert codes.shape == x.shape and codes.dtype == torch.uint8
        assert absmax.numel() == -(-n // 256)
        y = q.dequantize_blockwise(codes, absmax, signed)
        assert y.shape == x.shape and not bool(torch.isnan(y).any())
        assert torch.equal(y, x), "0 and the block absmax are exact codes"
        if fill == 0.0 and n:
            assert bool((absmax == q.ABSMAX_FLOOR).all())


def test_dtypes_noncontiguous_and_out():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=g)
    ref_c, ref_a = q.quantize_blockwise(base.t().contiguous(), True)
    c, a = q.quantize_blockwise(base.t(), True)  # non-contiguous view
    assert torch.equal(c, ref_c) and torch.equal(a, ref_a)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        c, a = q.quantize_blockwise(base.to(dt), True)
        c2, a2 = q.quantize_blockwise(base.to(dt).float(), True)
        assert torch.equal(c, c2) and torch.equal(a, a2)
    y = q.dequantize_blockwise(ref_c, ref_a, True)
    out = torch.empty(48, 64)
    assert q.dequantize_blockwise(ref_c, ref_a, True, out=out) is out and torch.equal(out, y)
    out16 = torch.empty(48, 64, dtype=torch.bfloat16)
    q.dequantize_blockwise(ref_c, ref_a, True, out=out16)
    assert torch.equal(out16, y.bfloat16())
    assert q.dequantize_blockwise(ref_c, ref_a, True, dtype=torch.float16).dtype == torch.float16
    flat = q.dequantize_blockwise(ref_c.reshape(-1), ref_a, True, shape=(48, 64))
    assert torch.equal(flat, y)


def test_block_size_validation_and_inference():
    x = torch.randn(1000)
    with pytest.raises(ValueError):
        q.quantize_blockwise(x, True, block_size=100)
    with pytest.raises(ValueError):
        q.quantize_blockwise(x, True, rounding="stochastic")  # no seed
    with pytest.raises(ValueError):
        q.quantize_blockwise(x, True, rounding="up")
    c, a = q.quantize_blockwise(x, True, block_size=64)
    assert torch.equal(q.dequantize_blockwise(c, a, True),
                       q.dequantize_blockwise(c, a, True, block_size=64))
    with pytest.raises(ValueError):
        q.dequantize_blockwise(c, a, True, block_size=256)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 5000), log2b=st.integers(0, 12))
def test_infer_block_size_property(n, log2b):
    b = 1 << log2b
    nb = -(-n // b)
    got = q.infer_block_size(n, nb)
    assert got & (got - 1) == 0 and -(-n // got) == nb
    if nb > 1:
        assert got == b


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    log_scale=st.floats(-30, 30),
    signed=st.booleans(),
    log2b=st.integers(4, 9),
    seed=st.integers(0, 2**63 - 1),
)
def test_roundtrip_property(shape, log_scale, signed, log2b, seed):
    block = 1 << log2b
    g = torch.Generator().manual_seed(seed % (2**31))
    x = torch.randn(shape, generator=g) * math.exp(log_scale)
    if not signed:
        x = x.abs()
    codes, absmax = q.quantize_blockwise(x, signed, block_size=block)
    y = q.dequantize_blockwise(codes, absmax, signed)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    if x.numel():
        assert bool(((y - x).abs().reshape(-1) <= _nearest_bound(x, signed, block)).all())
    cs, a2 = q.quantize_blockwise(x, signed, block_size=block, rounding="stochastic", seed=seed)
    assert torch.equal(a2, absmax)
    assert bool(((cs.long() - codes.long()).abs() <= 1).all()), "SR picks a neighbour of nearest"


# --------------------------------------------------------------------------- chunks, pairs, in place


def _all_codes(x, lr):
    """Every code path on one input: both maps and roundings, block sizes below and above the
    chunk, the log codec at 8 and 16 bits, and the decoded values."""
    out = []
    for signed in (True, False):
        xx = x if signed else x.abs()
        for block in (64, 256, 4096):
            for rounding, seed in (("nearest", None), ("stochastic", 7)):
                c, a = q.quantize_blockwise(xx, signed, block_size=block, rounding=rounding, seed=seed)
                out += [c, a, q.dequantize_blockwise(c, a, signed)]
    for bits in (8, 16):
        for rounding, seed in (("nearest", None), ("stochastic", 7)):
            c = q.quantize_log(lr, 1e-7, 1e-3, bits=bits, rounding=rounding, seed=seed)
            out += [c, q.dequantize_log(c, 1e-7, 1e-3)]
    return out


@pytest.mark.parametrize("n", [40_001, 40_960])
def test_codes_do_not_depend_on_chunking_or_pair_gathers(monkeypatch, n):
    """The work is split into chunks and reads table entries two codes at a time; neither may
    change a code or a decoded value (the noise is indexed by the global element position)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, generator=g) * torch.randn(n, generator=g).exp()
    lr = torch.rand(n, generator=g).mul(math.log(1e4)).exp().mul(1e-7)
    ref = _all_codes(x, lr)
    monkeypatch.setattr(q._engine, "_CHUNK", 1024)  # blocks of 4096 now span several chunks
    small = _all_codes(x, lr)
    monkeypatch.setattr(q._engine, "_U16", {"cpu": False})  # pair index without uint16 support
    signed16 = _all_codes(x, lr)
    monkeypatch.setattr(q._engine, "_PAIRS", False)  # one code per gather, as on a big-endian machine
    single = _all_codes(x, lr)
    for a, b, c, d in zip(ref, small, signed16, single):
        assert a.dtype == b.dtype == c.dtype == d.dtype
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_nearest_codes_equal_bucketize_of_normalised_input():
    """quantize_blockwise itself (multi-chunk, partial block) is exactly bucketize(x / absmax)."""
    g = torch.Generator().manual_seed(12)
    n = 3 * (1 << 18) + 77
    x = torch.randn(n, generator=g) * torch.randn(n, generator=g).mul(3).exp()
    for signed in (True, False):
        xx = x if signed else x.abs()
        m = q.dynamic_map(signed)
        c, a = q.quantize_blockwise(xx, signed)
        v = xx / a.repeat_interleave(256)[:n]
        assert torch.equal(c.long(), torch.bucketize(v, (m[1:] + m[:-1]) / 2))


def test_in_place_outputs():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 301, generator=g)
    for signed in (True, False):
        xx = x if signed else x.abs()
        for rounding, seed in (("nearest", None), ("stochastic", 3)):
            ref_c, ref_a = q.quantize_blockwise(xx, signed, rounding=rounding, seed=seed)
            codes = torch.full((5, 301), 77, dtype=torch.int8)
            absmax = torch.zeros(6)
            c, a = q.quantize_blockwise(xx, signed, rounding=rounding, seed=seed, codes_out=codes, absmax_out=absmax)
            assert c is codes and a is absmax
            assert torch.equal(codes.view(torch.uint8), ref_c) and torch.equal(absmax, ref_a)
            # a codes buffer at an odd byte offset (no two-codes-per-gather view possible)
            buf = torch.zeros(1 + x.numel(), dtype=torch.uint8)
            q.quantize_blockwise(xx, signed, rounding=rounding, seed=seed, codes_out=buf[1:])
            assert torch.equal(buf[1:].view(5, 301), ref_c) and int(buf[0]) == 0
            # decoding into an fp32 buffer at an odd offset, from codes at an odd offset
            out = torch.zeros(1 + x.numel())
            q.dequantize_blockwise(buf[1:], ref_a, signed, out=out[1:])
            assert torch.equal(out[1:], q.dequantize_blockwise(ref_c, ref_a, signed).reshape(-1))
    with pytest.raises(ValueError):
        q.quantize_blockwise(x, True, codes_out=torch.empty(5, 301, dtype=torch.int32))
    with pytest.raises(ValueError):
        q.quantize_blockwise(x, True, absmax_out=torch.empty(5))
    lr = torch.rand(1001, generator=g) * 1e-3
    for bits, dt in ((8, torch.uint8), (16, torch.int16)):
        ref = q.quantize_log(lr, 1e-7, 1e-3, bits=bits, seed=5)
        out = torch.empty(1001, dtype=dt)
        assert q.quantize_log(lr, 1e-7, 1e-3, bits=bits, seed=5, out=out) is out and torch.equal(out, ref)
        with pytest.raises(ValueError):
            q.quantize_log(lr, 1e-7, 1e-3, bits=bits, seed=5, out=torch.empty(1001, dtype=torch.float32))


def test_threads_do_not_share_scratch():
    """CPU scratch buffers are kept per thread: concurrent calls give the sequential codes."""
    import threading

    g = torch.Generator().manual_seed(15)
    xs = [torch.randn(n, generator=g) for n in (70_000, 300_001, 5_000, 262_144)]
    ref = [q.quantize_blockwise(x, True, rounding="stochastic", seed=i) for i, x in enumerate(xs)]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                got[i] = q.quantize_blockwise(xs[i], True, rounding="stochastic", seed=i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i, (c, a) in enumerate(ref):
        assert torch.equal(got[i][0], c) and torch.equal(got[i][1], a)


def test_store_inplace_reuses_the_state_tensors():
    g = torch.Generator().manual_seed(14)
    a, b = {}, {}
    for step in range(3):
        x = torch.randn(40, 33, generator=g)
        lr = torch.rand(40, 33, generator=g) * 1e-3
        q.store(a, "m", x, signed=True, seed=step)
        q.store_log(a, "lr", lr, lo=1e-7, hi=1e-3, seed=step)
        before = {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
        q.store(b, "m", x, signed=True, seed=step, inplace=True)
        q.store_log(b, "lr", lr, lo=1e-7, hi=1e-3, seed=step, inplace=True)
        for k, v in before.items():
            assert b[k] is v, "same tensor object, written in place"
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
            else:
                assert a[k] == b[k]
    old = b["m_f8"]
    q.store(b, "m", torch.randn(7), signed=True, seed=0, inplace=True)  # new shape: new tensors
    assert b["m_f8"] is not old and b["m_f8"].shape == (7,)


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nonfinite_poisons_only_its_block(bad, rounding):
    x = torch.randn(3, 256)
    x[1, 7] = bad
    codes, absmax = q.quantize_blockwise(x, True, rounding=rounding, seed=1)
    assert torch.isnan(absmax[1]) and bool(torch.isfinite(absmax[[0, 2]]).all())
    y = q.dequantize_blockwise(codes, absmax, True)
    assert bool(torch.isnan(y[1]).all())
    assert bool((y[[0, 2]] - x[[0, 2]]).abs().le(0.05 * x[[0, 2]].abs().amax()).all())
    with pytest.raises(ValueError):
        q.quantize_blockwise(x, True, check_finite=True)


# --------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("signed", [True, False])
def test_against_bitsandbytes(signed):
    """Same map, bit-identical absmax, and bnb decodes our codes to exactly our values.

    bnb's CPU kernel is not an exact nearest search: near ties it may take the farther code,
    and for normalised |v| < 1e-3 it is often off (up to ~7 codes below 1e-5, all within
    1e-4 * absmax). So: for |v| >= 1e-2 >= 99 % identical codes and never more than one
    code apart; everywhere ours is never farther from x than bnb's, and the two dequantised
    values differ by at most one code gap or 1e-4 * absmax."""
    F = _bnb()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300_001, generator=g) * torch.randn(300_001, generator=g).exp()) * 1e-3
    if not signed:
        x = x.square()
    code = F.create_dynamic_map(signed)
    cb, qs = F.quantize_blockwise(x, code=code, blocksize=256)
    c, a = q.quantize_blockwise(x, signed, block_size=256)
    assert torch.equal(qs.absmax, a)
    big = (x / a.repeat_interleave(256)[: x.numel()]).abs() >= 1e-2
    assert float((cb[big] == c[big]).float().mean()) >= 0.99
    assert int((cb[big].int() - c[big].int()).abs().max()) <= 1
    yb = F.dequantize_blockwise(cb, qs)
    y = q.dequantize_blockwise(c, a, signed)
    same = cb == c
    assert torch.equal(y[same], yb[same])
    assert bool(((y - x).abs() <= (yb - x).abs() * (1 + 1e-6) + 1e-30).all())
    m = q.dynamic_map(signed)
    am = a.repeat_interleave(256)[: x.numel()]
    cl = c.long()
    gap = torch.maximum(m[(cl + 1).clamp(max=255)] - m[cl], m[cl] - m[(cl - 1).clamp(min=0)])
    assert bool(((y - yb).abs() <= (torch.maximum(gap, torch.full_like(gap, 1e-4)) + 1e-6) * am).all())
    yb_ours = F.dequantize_blockwise(c, absmax=a, code=code, blocksize=256)
    assert torch.equal(yb_ours, y)


# --------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_unbiased_and_deterministic(signed):
    g = torch.Generator().manual_seed(4)
    v = torch.rand(4096, generator=g) * (2 if signed else 1) - (1 if signed else 0)
    v = v.view(16, 256)
    v[:, 0] = 1.0  # every block's absmax is 1, so x holds the normalised values
    x = v.reshape(-1)
    rng_before = torch.get_rng_state()
    acc = torch.zeros_like(x, dtype=torch.float64)
    trials = 400
    for s in range(trials):
        c, a = q.quantize_blockwise(x, signed, rounding="stochastic", seed=s)
        acc += q.dequantize_blockwise(c, a, signed).double()
    assert torch.equal(torch.get_rng_state(), rng_before), "no global RNG use"
    mean = acc / trials
    m = q.dynamic_map(signed)
    k = (torch.bucketize(x, m, right=True) - 1).clamp(0, 254)
    gap = (m[k + 1] - m[k]).double()
    # per element: |mean - x| <= 5 sigma of a Bernoulli(p) * gap average (+ slack beyond -0.993)
    tol = 5 * gap * 0.5 / math.sqrt(trials) + (x.double() - x.double().clamp(min=float(m[0]))).abs() + 1e-7
    assert bool(((mean - x.double()).abs() <= tol).all())
    overall = (mean - x.double())[x >= m[0]].mean().abs()
    assert float(overall) < 2e-4
    c1, _ = q.quantize_blockwise(x, signed, rounding="stochastic", seed=123)
    c2, _ = q.quantize_blockwise(x, signed, rounding="stochastic", seed=123)
    c3, _ = q.quantize_blockwise(x, signed, rounding="stochastic", seed=124)
    assert torch.equal(c1, c2) and not torch.equal(c1, c3)


def test_ema_stall_demo():
    """beta2 = 0.999, an element at 0.5 * absmax with zero gradient next to an element held at
    1 by its gradient: nearest rounding stalls at ~0.497 for 3000 steps, stochastic rounding
    decays with the fp32 reference (mean over 4095 elements within 3 %)."""
    nblk = 16
    v = torch.full((nblk, 256), 0.5)
    v[:, 0] = 1.0
    g2 = torch.zeros_like(v)
    g2[:, 0] = 1.0
    ref = v.clone()
    st_n, st_s = {}, {}
    q.store(st_n, "v", v, signed=False, rounding="nearest")
    q.store(st_s, "v", v, signed=False, seed=0)
    for step in range(1, 3001):
        ref.mul_(0.999).add_(g2, alpha=0.001)
        x = q.load(st_n, "v").mul_(0.999).add_(g2, alpha=0.001)
        q.store(st_n, "v", x, signed=False, rounding="nearest")
        x = q.load(st_s, "v").mul_(0.999).add_(g2, alpha=0.001)
        q.store(st_s, "v", x, signed=False, seed=q.mix_seed(7, step))
    target = float(ref[0, 1])
    assert target == pytest.approx(0.5 * 0.999 ** 3000, rel=1e-3)
    vn, vs = q.load(st_n, "v"), q.load(st_s, "v")
    assert float(vn[:, 1:].min()) > 0.49, "nearest rounding stalls"
    assert float(vs[:, 1:].mean()) == pytest.approx(target, rel=0.03)
    assert float(vs[:, 0].min()) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- lr-mask codec


@pytest.mark.parametrize("bits", [8, 16])
def test_log_codec_range_and_exact_ends(bits):
    lo, hi = 1e-7, 1e-3
    lv = q.log_levels(lo, hi, bits)
    assert lv.numel() == 2 ** bits and bool((lv[1:] > lv[:-1]).all())
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert lv[0] == f32(lo) and lv[-1] == f32(hi)
    x = torch.tensor([1e-7, 1e-3, 3.9e-6, 2e-7, 5e-4, 1.3e-5, math.nan, math.inf, 1e-9, 1.0])
    for rounding, seed in (("nearest", None), ("stochastic", 11)):
        c = q.quantize_log(x, lo, hi, bits=bits, rounding=rounding, seed=seed)
        assert c.dtype == (torch.uint8 if bits == 8 else torch.int16) and c.shape == x.shape
        y = q.dequantize_log(c, lo, hi)
        assert bool((y > 0).all()), "nothing flushed to zero"
        assert y[0] == f32(lo) and y[1] == f32(hi)
        ratio = float(lv[1] / lv[0])
        rel = (y[:6] / x[:6] - 1).abs()
        assert bool((rel <= ratio - 1 + 1e-6).all())
        assert y[6] == f32(lo) and y[7] == f32(hi) and y[8] == f32(lo) and y[9] == f32(hi)
    # the failure mode this codec avoids: per-tensor int8 absmax storage
    scale = x[:6].abs().max() / 127
    assert float((x[:6] / scale).round().mul(scale)[0]) == 0.0


@pytest.mark.parametrize("bits", [8, 16])
def test_log_codec_index_is_exact(bits):
    """Every level decodes to itself; its fp32 neighbours land on the two bracketing levels."""
    lo, hi = 1e-7, 1e-3
    lv = q.log_levels(lo, hi, bits)
    for rounding, seed in (("nearest", None), ("stochastic", 1)):
        c = q.quantize_log(lv, lo, hi, bits=bits, rounding=rounding, seed=seed)
        assert torch.equal(q.dequantize_log(c, lo, hi), lv)
        for direction in (2.0, 0.0):
            nb = torch.nextafter(lv, torch.full_like(lv, direction))
            got = q.dequantize_log(q.quantize_log(nb, lo, hi, bits=bits, rounding=rounding, seed=seed), lo, hi)
            k = (torch.bucketize(nb.clamp(float(lv[0]), float(lv[-1])), lv, right=True) - 1).clamp(0, lv.numel() - 2)
            assert bool(((got == lv[k]) | (got == lv[k + 1])).all())


@pytest.mark.parametrize("bits,lo,hi", [(8, 1e-7, 1e-3), (8, 1.0, 1.5), (8, 0.5, 4.0), (16, 1e-7, 1e-3),
                                          (16, 1e-30, 1e30), (16, 1.0, 1.0001)])
def test_log_encoder_equals_bucketize(bits, lo, hi):
    """Nearest is exactly bucketize on the fp32 level midpoints (of the clamped input, NaN ->
    lo), stochastic picks one of the two bracketing levels, for wide, narrow and sub-resolution
    ranges (at 16 bits over [1, 1.0001] fp32 merges neighbouring levels)."""
    lv = q.log_levels(lo, hi, bits)
    mids = ((lv[1:].double() + lv[:-1].double()) / 2).float()
    g = torch.Generator().manual_seed(bits)
    a, b = math.log(lo), math.log(hi)
    x = torch.cat([
        torch.rand(200_000, generator=g).mul(b - a + 2).add(a - 1).exp(),
        lv, mids, torch.nextafter(mids, torch.full_like(mids, math.inf)), torch.nextafter(lv, torch.zeros_like(lv)),
        torch.tensor([0.0, -1.0, math.nan, math.inf, -math.inf, 3e38]),
    ])
    xc = torch.nan_to_num(x, nan=lo).clamp(float(lv[0]), float(lv[-1]))
    near = q.quantize_log(x, lo, hi, bits=bits, rounding="nearest")
    idx = near.long() + (1 << 15 if bits == 16 else 0)
    assert torch.equal(idx, torch.bucketize(xc, mids))
    k = (torch.bucketize(xc, lv, right=True) - 1).clamp(0, lv.numel() - 2)
    sr = q.quantize_log(x, lo, hi, bits=bits, seed=9).long() + (1 << 15 if bits == 16 else 0)
    assert bool(((lv[sr] == lv[k]) | (lv[sr] == lv[k + 1])).all())
    on_level = torch.isin(xc, lv)
    assert torch.equal(lv[sr[on_level]], xc[on_level]), "values on a level keep it"


def test_log_codec_low_precision_input():
    """bf16 / fp16 inputs are clamped in fp32 (their own rounding of lo could fall below it)."""
    lo, hi = 1e-7, 1e-3
    x = torch.tensor([lo, lo * 0.999, lo * 1.001, hi, hi * 1.001, 5e-5])
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dt)
        for rounding, seed in (("nearest", None), ("stochastic", 2)):
            got = q.quantize_log(xd, lo, hi, rounding=rounding, seed=seed)
            assert torch.equal(got, q.quantize_log(xd.float(), lo, hi, rounding=rounding, seed=seed))


@pytest.mark.parametrize("bits,rms_tol,bias_tol", [(8, 0.40, 0.02), (16, 0.005, 0.001)])
def test_log_codec_random_walk_tracks_fp32(bits, rms_tol, bias_tol):
    """+-bump random walks (Automagic-style) over 300 steps, same signs for fp32 and codec.
    Stated tolerance: mean over elements within bias_tol (2 % at 8 bits, 0.1 % at 16) and
    per-element RMS error below rms_tol of the mean value (40 % at 8 bits: stochastic
    rounding noise ~ sqrt(N * bump * gap); 0.5 % at 16 bits)."""
    lo, hi, n = 1e-7, 1e-3, 8192
    for start, bump, p_agree in ((1e-6, 1e-6, 0.6), (5e-4, 2e-6, 0.5), (1e-7, 1e-6, 0.45)):
        g = torch.Generator().manual_seed(0)
        ref = torch.full((n,), start)
        state = {}
        q.store_log(state, "lr", ref, lo=lo, hi=hi, bits=bits, seed=0)
        for step in range(1, 301):
            sgn = (torch.rand(n, generator=g) < p_agree).float() * 2 - 1
            ref = (ref + bump * sgn).clamp(lo, hi)
            x = (q.load_log(state, "lr") + bump * sgn).clamp(lo, hi)
            q.store_log(state, "lr", x, lo=lo, hi=hi, bits=bits, seed=step)
        x = q.load_log(state, "lr")
        assert float(x.min()) >= lo * (1 - 1e-6)
        assert float(x.mean() / ref.mean() - 1) == pytest.approx(0.0, abs=bias_tol)
        assert float((x - ref).pow(2).mean().sqrt() / ref.mean()) < rms_tol


def test_log_codec_small_bumps_survive_on_average():
    """A bump of 1e-6 at lr 1e-3 is 1/37 of an 8-bit level gap: nearest loses it, SR keeps it."""
    lo, hi = 1e-7, 1e-3
    x = torch.full((20000,), 5e-4)
    c_near = q.quantize_log(x, lo, hi, rounding="nearest")
    y_near = q.dequantize_log(c_near, lo, hi)
    drift_near = q.dequantize_log(q.quantize_log(y_near + 1e-6, lo, hi, rounding="nearest"), lo, hi)
    assert torch.equal(drift_near, y_near), "nearest rounding swallows the bump"
    y_sr = q.dequantize_log(q.quantize_log(y_near + 1e-6, lo, hi, seed=3), lo, hi)
    assert float((y_sr - y_near).mean()) == pytest.approx(1e-6, rel=0.1)


# --------------------------------------------------------------------------- state dicts


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_store_load_state_dict_bit_exact():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(33, 17, generator=g)
    v = torch.rand(5000, generator=g) * 1e-6
    lr = torch.rand(700, generator=g) * 1e-3 + 1e-7
    s = {"step": torch.tensor(3.0)}
    q.store(s, "exp_avg", m, signed=True, seed=1)
    q.store(s, "exp_avg_sq", v, signed=False, seed=1, block_size=128)
    q.store_log(s, "lr_mask", lr, lo=1e-7, hi=1e-3, seed=1)
    q.store_log(s, "lr_mask16", lr, lo=1e-7, hi=1e-3, bits=16, seed=1)
    assert s["exp_avg_f8"].dtype == torch.int8 and s["exp_avg_sq_f8"].dtype == torch.uint8
    assert s["lr_mask_lq"].dtype == torch.uint8 and s["lr_mask16_lq"].dtype == torch.int16
    assert q.has_quantized(s, "exp_avg") and not q.has_quantized(s, "nope")
    sd = {"state": {0: s}, "param_groups": [{"params": [0], "lr": 1e-4}]}
    back = _roundtrip(sd)["state"][0]
    assert set(back) == set(s)
    for k, val in s.items():
        if isinstance(val, torch.Tensor):
            assert back[k].dtype == val.dtype and torch.equal(back[k], val), k
        else:
            assert back[k] == val
    assert torch.equal(q.load(back, "exp_avg"), q.load(s, "exp_avg"))
    assert torch.equal(q.load(back, "exp_avg_sq"), q.load(s, "exp_avg_sq"))
    assert torch.equal(q.load_log(back, "lr_mask"), q.load_log(s, "lr_mask"))
    assert torch.equal(q.load_log(back, "lr_mask16"), q.load_log(s, "lr_mask16"))
    assert q.load(s, "exp_avg").shape == m.shape
    assert (q.load(s, "exp_avg") - m).abs().max() <= 0.07 * m.abs().max()  # one float8 gap at most
    assert q.state_nbytes(s) == (33 * 17 + 4 * 3) + (5000 + 4 * 40) + 700 + 1400 + 4


def test_resume_is_bit_exact():
    """Seeds derived from saved integers: stop, save, load, continue == uninterrupted run."""
    def run(state, steps, base=99):
        for step in steps:
            m = q.load(state, "m").mul_(0.9).add_(torch.sin(torch.arange(3000.0) * step), alpha=0.1)
            q.store(state, "m", m, signed=True, seed=q.mix_seed(base, step))
            lr = q.load_log(state, "lr").add_(1e-6 * torch.cos(torch.arange(3000.0) * step).sign())
            q.store_log(state, "lr", lr, lo=1e-7, hi=1e-3, seed=q.mix_seed(base, step))
        return state

    def fresh():
        s = {}
        q.store_zeros(s, "m", (3000,), signed=True)
        q.store_log(s, "lr", torch.full((3000,), 1e-5), lo=1e-7, hi=1e-3, seed=0)
        return s

    full = run(fresh(), range(1, 21))
    half = _roundtrip(run(fresh(), range(1, 11)))
    resumed = run(half, range(11, 21))
    for k in full:
        if isinstance(full[k], torch.Tensor):
            assert torch.equal(full[k], resumed[k]) and full[k].dtype == resumed[k].dtype


@pytest.mark.parametrize("signed", [True, False])
def test_store_zeros_matches_store(signed):
    a, b = {}, {}
    q.store_zeros(a, "x", (4, 300), signed=signed)
    q.store(b, "x", torch.zeros(4, 300), signed=signed, rounding="nearest")
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype


def test_codes_cast_by_plain_optimizer_load():
    """torch.optim.Optimizer.load_state_dict casts uint8/int8 state to the param dtype: the
    codes are still decodable given the map, and load() refuses instead of guessing."""
    p = torch.nn.Parameter(torch.zeros(600, dtype=torch.bfloat16))
    opt = torch.optim.SGD([p], lr=0.1)
    x = torch.randn(600)
    q.store(opt.state[p], "m", x, signed=True, seed=1)
    expect = q.load(opt.state[p], "m")
    opt2 = torch.optim.SGD([p], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    st2 = opt2.state[p]
    assert st2["m_f8"].dtype == torch.bfloat16  # torch's behaviour, not ours
    with pytest.raises(ValueError, match="cast on load"):
        q.load(st2, "m")
    got = q.dequantize_float8(st2["m_f8"], opt.state[p]["m_absmax"], signed=True)
    assert torch.equal(got, expect)


PINNED = 8089726588679811643


def test_mix_seed():
    assert q.mix_seed(1, 2, "exp_avg") == q.mix_seed(1, 2, "exp_avg")
    seeds = {q.mix_seed(b, s, k) for b in range(3) for s in range(50) for k in ("a", "b")}
    assert len(seeds) == 300 and all(0 <= s < 2 ** 63 for s in seeds)
    assert q.mix_seed(0) != q.mix_seed(0, 0)
    assert q.mix_seed(1, 2, "exp_avg") == PINNED  # changing the derivation breaks resumes
    with pytest.raises(TypeError):
        q.mix_seed(torch.tensor(1))


@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1000, generator=g).to(device)
    for signed in (True, False):
        xx = x if signed else x.abs()
        c, a = q.quantize_blockwise(xx, signed)
        assert c.device == xx.device and a.device == xx.device
        c_cpu, a_cpu = q.quantize_blockwise(xx.cpu(), signed)
        assert torch.equal(c.cpu(), c_cpu) and torch.equal(a.cpu(), a_cpu)
        y = q.dequantize_blockwise(c, a, signed)
        assert y.device == xx.device
        cs, _ = q.quantize_blockwise(xx, signed, rounding="stochastic", seed=1)
        assert bool(((cs.long() - c.long()).abs() <= 1).all())
    lc = q.quantize_log(x.abs() * 1e-4 + 1e-7, 1e-7, 1e-3, seed=2)
    assert lc.device == x.device and q.dequantize_log(lc, 1e-7, 1e-3).device == x.device


# --------------------------------------------------------------------------- float8 codec


def _f8_reference_values(signed: bool) -> torch.Tensor:
    """y(c) / TOP for every uint8 code, from the format's definition, in float64."""
    m = 3 if signed else 4
    top = 2.0 - 2.0 ** -m
    out = []
    for c in range(256):
        mag = c & 0x7F if signed else c
        if mag < (1 << m):
            y = mag * 2.0 ** -(14 + m)
        else:
            y = 2.0 ** ((mag >> m) - 15) * (1 + (mag & ((1 << m) - 1)) / 2.0 ** m)
        out.append((-y if signed and c & 0x80 else y) / top)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("signed", [True, False])
def test_float8_values_follow_the_format(signed):
    v = q.float8_values(signed)
    ref = _f8_reference_values(signed)
    assert v.dtype == torch.float32 and v.shape == (256,)
    assert torch.allclose(v.double(), ref, rtol=2e-7, atol=0)
    pos = v[:128] if signed else v
    assert float(pos[0]) == 0.0 and float(pos[-1]) == 1.0 and bool((pos[1:] > pos[:-1]).all())
    if signed:
        assert torch.equal(v[128:], -v[:128])
    # relative gap: 2^-M .. 2^-(M-1) above the linear range
    rel = (pos[1:] - pos[:-1]) / pos[1:]
    m = 3 if signed else 4
    normal = pos[1:] >= pos[1 << m] * 1.0001
    assert float(rel[normal].max()) <= 2.0 ** -(m - 1) * 1.0001 and float(rel[normal].min()) >= 2.0 ** -(m + 1) * 0.9999


def _f8_sorted(signed):
    v = q.float8_values(signed).double()
    order = torch.argsort(v)
    return v[order], order


@pytest.mark.parametrize("signed", [True, False])
def test_float8_nearest_is_bucketize_on_midpoints(signed):
    """Multi-chunk input with a partial last block: the code is the nearest map value of
    x / absmax (ties up), found without any search, and the error is at most half a gap."""
    g = torch.Generator().manual_seed(21)
    n = 2 * (1 << 18) + 1000 + 77
    x = torch.randn(n, generator=g) * torch.randn(n, generator=g).mul(3).exp()
    x[:3000] *= 1e-6  # values in the linear range
    if not signed:
        x = x.abs()
    codes, absmax = q.quantize_float8(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    am = _blocks_absmax(x, 256).double()
    vals, order = _f8_sorted(signed)
    mids = (vals[1:] + vals[:-1]) / 2
    expect = order[torch.bucketize((x.double() / am), mids, right=True)]
    c = codes.view(torch.uint8).long()
    assert float((c == expect).double().mean()) > 0.9999  # fp32 vs float64 division at exact ties
    y = q.dequantize_float8(codes, absmax, signed)
    err = (y.double() - x.double()).abs()
    gap = torch.maximum(vals[1:] - vals[:-1], torch.zeros(1, dtype=torch.float64))
    k = torch.bucketize((x.double() / am).clamp(float(vals[0]), float(vals[-1])), vals[1:-1])
    assert bool((err <= 0.5 * gap[k] * am * (1 + 1e-5) + 1e-12 * am).all())


@pytest.mark.parametrize("signed", [True, False])
def test_float8_stochastic_unbiased_deterministic_and_chunk_independent(signed, monkeypatch):
    g = torch.Generator().manual_seed(22)
    x = (torch.rand(16, 256, generator=g) * (2 if signed else 1) - (1 if signed else 0))
    x[:, 0] = 1.0
    x[3, 1:100] *= 1e-5  # the linear range
    x = x.reshape(-1)
    rng_before = torch.get_rng_state()
    trials = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for s in range(trials):
        c, a = q.quantize_float8(x, signed, rounding="stochastic", seed=s)
        acc += q.dequantize_float8(c, a, signed).double()
    assert torch.equal(torch.get_rng_state(), rng_before), "no global RNG use"
    vals, _ = _f8_sorted(signed)
    k = torch.bucketize(x.double(), vals[1:-1])
    gap = (vals[1:] - vals[:-1])[k]
    assert bool(((acc / trials - x.double()).abs() <= 5 * gap * 0.5 / math.sqrt(trials) + 1e-9).all())
    assert float((acc / trials - x.double()).mean().abs()) < 2e-4
    c1, a1 = q.quantize_float8(x, signed, rounding="stochastic", seed=123)
    c2, _ = q.quantize_float8(x, signed, rounding="stochastic", seed=123)
    c3, _ = q.quantize_float8(x, signed, rounding="stochastic", seed=124)
    assert torch.equal(c1, c2) and not torch.equal(c1, c3)
    exact = (x == 1.0) | (x == 0.0)
    assert torch.equal(q.dequantize_float8(c1, a1, signed)[exact], x[exact]), "0 and absmax never move"
    big = torch.randn(300_001, generator=g)
    ref = q.quantize_float8(big, signed, rounding="stochastic", seed=9)
    monkeypatch.setattr(q._engine, "_CHUNK", 1024)
    small = q.quantize_float8(big, signed, rounding="stochastic", seed=9)
    assert torch.equal(ref[0], small[0]) and torch.equal(ref[1], small[1])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (255,), (256,), (257,), (2, 3, 129)])
def test_float8_shapes_zeros_and_exact_absmax(signed, rounding, shape):
    for fill in (0.0, 1.5, -2.5e-3):
        x = torch.full(shape, fill if signed else abs(fill))
        codes, absmax = q.quantize_float8(x, signed, rounding=rounding, seed=5)
        assert codes.shape == x.shape and absmax.numel() == -(-x.numel() // 256)
        y = q.dequantize_float8(codes, absmax, signed)
        assert y.shape == x.shape and torch.equal(y, x), "0 and the block absmax are exact codes"


@pytest.mark.parametrize("signed", [True, False])
def test_float8_extreme_magnitudes_and_nonfinite(signed):
    for x in (torch.tensor([1e-40, 3e-41, 0.0, 7e-42]), torch.tensor([3e38, 1e38, 0.0, 2e30])):
        for xx in (x, -x) if signed else (x,):
            for rounding in ("nearest", "stochastic"):
                c, a = q.quantize_float8(xx, signed, rounding=rounding, seed=0)
                y = q.dequantize_float8(c, a, signed)
                assert bool(torch.isfinite(y).all())
                assert bool(((y - xx).abs() <= 0.07 * max(float(xx.abs().max()), q.ABSMAX_FLOOR)).all())
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.rand(3, 256) + 0.1
        x[1, 7] = bad if signed else abs(bad)
        c, a = q.quantize_float8(x, signed, rounding="stochastic", seed=1)
        y = q.dequantize_float8(c, a, signed)
        assert bool(torch.isnan(y[1]).all())
        assert bool(((y[[0, 2]] - x[[0, 2]]).abs() <= 0.07 * x[[0, 2]].abs().amax()).all())


def test_float8_unsigned_stores_magnitudes_and_codes_out():
    x = torch.tensor([-3.0, 2.0, -0.0, 0.5, -1e-3])
    c, a = q.quantize_float8(x, False)
    c2, a2 = q.quantize_float8(x.abs(), False)
    assert torch.equal(c, c2) and torch.equal(a, a2) and float(q.dequantize_float8(c, a, False)[0]) == 3.0
    g = torch.Generator().manual_seed(23)
    x = torch.randn(5, 301, generator=g)
    ref_c, ref_a = q.quantize_float8(x, True, rounding="stochastic", seed=3)
    codes, absmax = torch.full((5, 301), 77, dtype=torch.uint8), torch.zeros(6)
    c, a = q.quantize_float8(x, True, rounding="stochastic", seed=3, codes_out=codes, absmax_out=absmax)
    assert c is codes and a is absmax and torch.equal(codes.view(torch.int8), ref_c) and torch.equal(absmax, ref_a)
    out = torch.zeros(1 + x.numel())
    q.dequantize_float8(codes, absmax, True, out=out[1:])
    assert torch.equal(out[1:], q.dequantize_float8(ref_c, ref_a, True).reshape(-1))
    assert torch.equal(q.dequantize_float8(ref_c.float(), ref_a, True), q.dequantize_float8(ref_c, ref_a, True))


def test_upgrade_dynamic_reencodes_old_checkpoints():
    g = torch.Generator().manual_seed(24)
    m, v = torch.randn(40, 33, generator=g), torch.rand(700, generator=g)
    st = {"step": 3}
    q.store(st, "exp_avg", m, signed=True, seed=1, code="dynamic")
    q.store(st, "v", v, signed=False, seed=1, code="dynamic", block_size=64)
    old_m, old_v = q.load(st, "exp_avg"), q.load(st, "v")
    assert q.upgrade_dynamic(st) == 2
    assert "exp_avg_q8" not in st and st["exp_avg_f8"].dtype == torch.int8 and st["v_f8"].dtype == torch.uint8
    assert st["v_absmax"].numel() == -(-700 // 64)
    assert bool(((q.load(st, "exp_avg") - old_m).abs() <= 0.04 * old_m.abs().amax()).all())
    assert bool(((q.load(st, "v") - old_v).abs() <= 0.04 * old_v.abs().amax()).all())
    assert q.upgrade_dynamic(st) == 0 and st["step"] == 3


@pytest.mark.parametrize("codec", ["float8-signed", "float8-unsigned", "log"])
def test_a_chunk_encoded_at_once_has_the_codes_of_its_tensors_encoded_alone(codec):
    """The 8-bit state store encodes a whole chunk in one call with per-tensor noise streams
    (``segment_noise``): every tensor's codes must equal storing it alone with its own seed,
    across block padding, odd sizes and a tensor longer than the noise window."""
    from library.optimizers.quant8._engine import _CHUNK, log_segment_noise
    from library.optimizers.quant8.float8 import segment_noise

    gen = torch.Generator().manual_seed(3)
    sizes = [5120, 301, 1, _CHUNK + 77, 256]
    seeds = [q.mix_seed(11, 3, i, "exp_avg") for i in range(len(sizes))]
    xs = [torch.randn(n, generator=gen) for n in sizes]
    if codec == "log":
        xs = [x.abs() * 3 + 0.2 for x in xs]
        starts, total = [], 0
        for n in sizes:
            starts.append(total)
            total += n
        noise = log_segment_noise([(a, n, s) for a, n, s in zip(starts, sizes, seeds)], total + 1, None)
        codes = q.quantize_log(torch.cat(xs), 0.1, 10.0, bits=8, noise=noise)
        for a, x, s in zip(starts, xs, seeds):
            alone = q.quantize_log(x, 0.1, 10.0, bits=8, rounding="stochastic", seed=s)
            assert torch.equal(codes[a:a + x.numel()], alone)
        return
    signed = codec == "float8-signed"
    starts, total = [], 0
    for n in sizes:  # each tensor starts on a block boundary, the padding holds zeros
        starts.append(total)
        total += -(-n // 256) * 256
    flat = torch.zeros(total)
    for a, x in zip(starts, xs):
        flat[a:a + x.numel()] = x
    noise = segment_noise(signed, [(a, n, s) for a, n, s in zip(starts, sizes, seeds)], total, None)
    codes, absmax = q.quantize_float8(flat, signed=signed, block_size=256, noise=noise)
    for a, x, s in zip(starts, xs, seeds):
        alone, alone_absmax = q.quantize_float8(x, signed=signed, block_size=256, rounding="stochastic", seed=s)
        assert torch.equal(codes[a:a + x.numel()], alone)
        assert torch.equal(absmax[a // 256:a // 256 + alone_absmax.numel()], alone_absmax)
