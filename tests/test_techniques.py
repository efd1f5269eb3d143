"""Each technique against its equation (spec/algorithms.md), one function at a time."""
import math

import pytest
import torch

from library.optimizers.techniques import adopt, allora, hypergrad, lr_mask, tam
from library.optimizers.techniques import spd as spd_t
from library.optimizers.techniques.agr import agr_list_
from library.optimizers.techniques.cautious import cautious_list_
from library.optimizers.techniques.grams import grams_cautious_list_, grams_list_
from library.optimizers.techniques.orthograd import orthograd_list_
from library.optimizers.techniques.weight_decay import dynamic_multiplier, steps_to_floor

torch.manual_seed(0)


# One tensor at a time, for readable equation tests: each technique exists once, in list form
# (the optimizers call it on whole chunks); these shims hand it one-element lists.
def agr(g, out=None, tmp=None):
    x = g.clone() if out is None else out
    if g.numel() <= 1:
        return x.copy_(g)
    if x is g:
        xs = [x]  # in place: the same list object as input and output
        agr_list_(xs, xs, [torch.empty_like(x) if tmp is None else tmp])
    else:
        agr_list_([x], [g])
    return x


def orthograd_(g, w):
    orthograd_list_([g], [w])
    return g


def cautious_(u, g, tmp):
    us = [u]
    cautious_list_(us, us, [g], [tmp])
    return u


def grams_(u, g, tmp):
    us = [u]
    grams_list_(us, us, [g], [tmp])
    return u


def grams_cautious_(u, g, tmp, tmp2=None):
    us = [u]
    grams_cautious_list_(us, us, [g], [tmp])
    return u


def cosine(a, b):
    return tam.cosines([a], [b])[0]


def damping(s, cos, count, gamma):
    return tam.damping_list([s], cos.reshape(1), count, gamma)[0]


def tam_momentum_(m, x, d, beta1):
    tam.momentum_list_([m], [x], d.reshape(1), beta1)


def scale_(mask, agree, r, lo, hi):
    lr_mask.scale_list_([mask], [agree], r, lo, hi)


def adopt_normalize(g, v, k, eps, out):
    adopt.normalize_list_([out], [g], [v], k, eps)
    return out


def spd_pre_step(p, g, anchor, tmp):
    away, norm = spd_t.pre_step_list([p], [g], None if anchor is None else [anchor], [tmp])
    return away[0], norm[0]


def spd_project_(p, anchor, away, old_norm, lam, tmp):
    spd_t.project_list_([p], None if anchor is None else [anchor], away.reshape(1), old_norm.reshape(1), lam, [tmp])


# ------------------------------------------------------------------- AGR
def test_agr_matches_equation_and_alpha_sums_to_one():
    g = torch.randn(7, 5)
    alpha = g.abs() / g.abs().sum()
    assert float(alpha.sum()) == pytest.approx(1.0)
    assert torch.allclose(agr(g), g * (1 - alpha), atol=1e-7)


def test_agr_uniform_scalar_and_zero():
    n = 16
    g = torch.full((n,), -0.3)
    assert torch.allclose(agr(g), g * (1 - 1 / n))
    s = torch.tensor([2.5])
    assert torch.equal(agr(s), s)  # single element: left alone, not frozen
    z = torch.zeros(4, 4)
    out = agr(z)
    assert torch.equal(out, z) and not torch.isnan(out).any()


def test_agr_does_not_mutate_input_and_uses_out():
    g = torch.randn(3, 3)
    g0 = g.clone()
    out = torch.empty_like(g)
    res = agr(g, out=out, tmp=torch.empty_like(g))
    assert res is out and torch.equal(g, g0)


# -------------------------------------------------------------- OrthoGrad
def test_orthograd_orthogonal_and_norm_preserving():
    w = torch.randn(32, 16)
    g = torch.randn(32, 16)
    w0 = w.clone()
    out = orthograd_(g.clone(), w)
    cos = (out * w).sum() / (out.norm() * w.norm())
    assert abs(float(cos)) < 1e-5
    assert float(out.norm()) == pytest.approx(float(g.norm()), rel=1e-5)
    assert torch.equal(w, w0)


def test_orthograd_zero_weight_and_parallel_guard():
    g = torch.randn(10)
    assert torch.allclose(orthograd_(g.clone(), torch.zeros(10)), g)
    w = torch.randn(10)
    out = orthograd_((3.0 * w).clone(), w)  # g parallel to w: no noise amplification
    assert torch.isfinite(out).all()
    assert float(out.norm()) <= 1e-3 * float((3 * w).norm())


def test_orthograd_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    w = torch.nn.Parameter(torch.randn(12, 6))
    g = torch.randn(12, 6)
    ref = po.OrthoGrad(torch.optim.SGD([w], lr=1.0))
    w0 = w.detach().clone()
    w.grad = g.clone()
    ref.step()
    expected = w0 - w.detach()  # the orthogonalised gradient
    ours = orthograd_(g.clone(), w0)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ ADOPT
def test_adopt_normalize_first_call_is_zero_and_clip_grows():
    g = torch.tensor([5.0, -5.0])
    v = torch.zeros(2)
    out = torch.empty(2)
    assert torch.equal(adopt_normalize(g, v, 0, 1e-6, out), torch.zeros(2))
    v = torch.full((2,), 1e-12)  # tiny previous v, large gradient -> clipped
    assert torch.equal(adopt_normalize(g, v, 1, 1e-6, out), torch.tensor([1.0, -1.0]))
    c2 = 2 ** 0.25
    assert torch.allclose(adopt_normalize(g, v, 2, 1e-6, out), torch.tensor([c2, -c2]))


def test_adopt_second_moment_init_then_ema():
    v = torch.zeros(3)
    g = torch.tensor([1.0, 2.0, 3.0])
    adopt.update_second_moment_list_([v], [g], 0, 0.9)
    assert torch.equal(v, g * g)
    adopt.update_second_moment_list_([v], [g], 1, 0.9)
    assert torch.allclose(v, g * g)


# -------------------------------------------------------------------- TAM
def test_tam_cosine_scale_invariant_and_guarded():
    a, b = torch.randn(20), torch.randn(20)
    assert float(cosine(a, b)) == pytest.approx(float(cosine(a, 7.0 * b)), rel=1e-5)
    assert float(cosine(torch.zeros(5), b[:5])) == 0.0


def test_tam_aligned_gradients_damping_to_one():
    s = torch.zeros(())
    for c in range(1, 50):
        d = damping(s, torch.tensor(1.0), c, 0.9)
    assert float(d) == pytest.approx(1.0, abs=1e-5)


def test_tam_alternating_gradients_are_damped():
    """Gradients that keep flipping against the momentum enter it damped (d well below 1)."""
    beta1 = 0.9
    m = torch.zeros(4)
    s = torch.zeros(())
    g = torch.ones(4)
    ds = []
    for t in range(1, 40):
        x = g if t % 2 else -g
        if t > 1:
            d = damping(s, cosine(m, x), t - 1, 0.9)
            ds.append(float(d))
            tam_momentum_(m, x, d, beta1)
        else:
            m.lerp_(x, 1 - beta1)
    assert ds[0] == pytest.approx(0.0, abs=1e-6)  # first flip: cos = -1, bias-corrected
    assert sum(ds) / len(ds) < 0.6
    assert max(ds[5:]) < 0.9


# ---------------------------------------------------------- Cautious/Grams
def test_cautious_all_agree_none_agree_half_agree():
    u = torch.tensor([1.0, -2.0, 3.0, -4.0])
    tmp = torch.empty(4)
    assert torch.equal(cautious_(u.clone(), torch.sign(u), tmp), u)
    assert torch.equal(cautious_(u.clone(), -torch.sign(u), tmp), torch.zeros(4))
    g = torch.tensor([1.0, 1.0, -1.0, -1.0])  # agrees on 0 and 3
    assert torch.equal(cautious_(u.clone(), g, tmp), torch.tensor([2.0, 0.0, 0.0, -8.0]))


def test_grams_sign_of_gradient_magnitude_of_update():
    u = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g = torch.tensor([-1.0, -1.0, 2.0, 0.0])
    out = grams_(u.clone(), g, torch.empty(4))
    assert torch.equal(out, torch.tensor([-1.0, -2.0, 3.0, 0.0]))
    g0 = g.clone()
    grams_(u.clone(), g, torch.empty(4))
    assert torch.equal(g, g0)


def test_grams_cautious_combination_rule():
    u = torch.tensor([1.0, -2.0, 3.0, -4.0])
    g = torch.tensor([1.0, 1.0, -1.0, -1.0])
    phi = (u * g > 0).float()
    expected = 0.5 * torch.sign(g) * u.abs() + 0.5 * u * phi / phi.mean()
    out = grams_cautious_(u.clone(), g, torch.empty(4), torch.empty(4))
    assert torch.allclose(out, expected)
    # neither rule alone gives this
    assert not torch.allclose(out, grams_(u.clone(), g, torch.empty(4)))
    assert not torch.allclose(out, cautious_(u.clone(), g, torch.empty(4)))


# -------------------------------------------------------------------- SPD
def _spd_apply(theta, theta_new, g, anchor, lam):
    p = theta_new.clone()
    tmp = torch.empty_like(p)
    away, old = spd_pre_step(theta, g, anchor, tmp)
    spd_project_(p, anchor, away, old, lam, tmp)
    return p


@pytest.mark.parametrize("zero_anchor", [False, True])
def test_spd_matches_rule(zero_anchor):
    theta = torch.randn(6, 4)
    anchor = torch.zeros(6, 4) if zero_anchor else torch.randn(6, 4)
    dev = theta - anchor
    g = dev.clone()  # <g, theta - theta0> > 0: condition holds
    theta_new = theta + 0.3 * dev  # deviation grows
    ours = _spd_apply(theta, theta_new, g, None if zero_anchor else anchor, 1.0)
    ref = spd_t.spd_reference(theta, theta_new, g, anchor, 1.0)
    assert torch.allclose(ours, ref, atol=1e-6)
    # lambda = 1 puts the result back on the sphere of radius ||theta - theta0||
    assert float((ours - anchor).norm()) == pytest.approx(float(dev.norm()), rel=1e-5)


def test_spd_inactive_when_condition_fails_and_zero_norm_safe():
    theta = torch.randn(5)
    anchor = torch.randn(5)
    g = -(theta - anchor)  # c > 0: moving away is what lowers the loss
    theta_new = theta + 0.1
    assert torch.equal(_spd_apply(theta, theta_new, g, anchor, 1.0), theta_new)
    # theta == anchor and proposal == anchor: zero norms, no NaN
    out = _spd_apply(anchor.clone(), anchor.clone(), torch.randn(5), anchor, 1.0)
    assert torch.isfinite(out).all() and torch.equal(out, anchor)


# ------------------------------------------------------------ weight decay
def test_dynamic_weight_decay_floor_is_reachable():
    assert dynamic_multiplier(1000, 1000, 0.7, 0.1) == 1.0
    assert dynamic_multiplier(2000, 1000, 0.7, 0.1) == pytest.approx(0.7)
    assert dynamic_multiplier(3000, 1000, 0.7, 0.1) == pytest.approx(0.49)
    floor_step = steps_to_floor(1000, 0.7, 0.1)
    assert 7000 < floor_step < 8000
    assert dynamic_multiplier(int(floor_step) + 10, 1000, 0.7, 0.1) == 0.1


# ---------------------------------------------------------------- lr mask
def test_hypergrad_scale_is_the_multiplicative_rule_with_clamp_and_skip():
    """h <- clamp(h * exp(rate * c), lo, hi), per tensor, left alone where ok is False."""
    torch.manual_seed(0)
    cos_seq = torch.rand(40, 3) * 2 - 1
    cos_seq[:15] = 0.9  # long agreement: reaches the ceiling
    cos_seq[15:25] = -0.8  # overshoot: falls
    ok = torch.tensor([True, True, False])
    scales = [torch.ones(()) for _ in range(3)]
    rate, lo, hi = 0.5, 0.1, 100.0
    for c in cos_seq:
        hypergrad.scale_list_(scales, c, rate, lo, hi, ok)
    for i in range(2):
        h = 1.0
        for c in cos_seq[:, i].tolist():
            h = min(max(h * math.exp(rate * c), lo), hi)
        assert float(scales[i]) == pytest.approx(h, rel=1e-5)
    assert float(scales[2]) == 1.0  # a skipped tensor keeps its scale
    hit = [torch.ones(())]
    for _ in range(30):
        hypergrad.scale_list_(hit, torch.ones(1), rate, lo, hi)
    assert float(hit[0]) == pytest.approx(hi)


def test_lr_mask_agreement_is_the_sign_of_gradient_times_previous_momentum():
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    m = torch.tensor([0.5, 1.0, 0.0, 0.25])
    out = torch.empty(4)
    lr_mask.agreement_list_([out], [g], [m])
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0.0, 1.0]))


def test_lr_mask_moves_multiplicatively_and_clamps():
    mask = torch.ones(4)
    scale_(mask, torch.tensor([1.0, -1.0, 0.0, 1.0]), 0.25, 0.5, 1.5)
    e = math.exp(0.25)
    assert torch.allclose(mask, torch.tensor([e, 1 / e, 1.0, e]))
    for _ in range(3):
        scale_(mask, torch.tensor([1.0, -1.0, 0.0, -1.0]), 0.25, 0.5, 1.5)
    assert torch.allclose(mask, torch.tensor([1.5, 0.5, 1.0, 1 / (e * e)]))
    # scale-free: the same agreements move a mask the same relative amount at any level
    a, b = torch.full((1,), 0.2), torch.full((1,), 4.0)
    for x in (a, b):
        scale_(x, torch.ones(1), 0.1, 1e-3, 1e3)
    assert float(a / 0.2) == pytest.approx(float(b / 4.0))
    # no agreement (a skipped tensor's zeroed gradient): the mask keeps its bits
    m = torch.full((3,), 1.7)
    lr_mask.scale_list_([m], [torch.zeros(3)], 0.5, 0.1, 10.0)
    assert torch.equal(m, torch.full((3,), 1.7))


def test_lr_mask_step_has_the_bits_of_the_exponential_without_computing_it():
    """For a prepared rate, exp(r a) (a in {-1, 0, 1}) is formed as max(1 + (e^r - 1) a, e^-r):
    the same bits as the exponential at every rate, the defaults included; where rounding would
    differ (a tiny r) prepare() keeps the exponential, as it is for a rate never prepared."""
    gen = torch.Generator().manual_seed(0)
    rates = [0.02, 0.05, 0.25, 0.69, 1.0, 1e-3, 1e-5, 1e-8] + torch.rand(200, generator=gen).tolist()
    lr_mask.prepare(rates, ["cpu"])
    for r in rates + [0.123456789]:  # the last one is not prepared
        agree = torch.randint(-1, 2, (4096,), generator=gen).float()
        agree[:4] = torch.tensor([1.0, -1.0, 0.0, -0.0])
        mask = torch.rand(4096, generator=gen) * 4 + 0.2
        expected = torch.clamp(mask * torch.exp(agree * r), 0.1, 10.0)
        lr_mask.scale_list_([mask], [agree], r, 0.1, 10.0)
        assert torch.equal(mask, expected), r
    cheap = [r for r in rates if lr_mask._FACTORS[(r, "cpu")] is not None]
    assert 0.05 in cheap and 0.02 in cheap and len(cheap) > len(rates) // 2
    assert (0.123456789, "cpu") not in lr_mask._FACTORS
    # the optimizers prepare their groups' rates when the groups are built (not inside step())
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
    from library.optimizers.automagic import Automagic_CameAMP

    AdaptiveHinaAdamW([torch.nn.Parameter(torch.ones(2))], lr_mask_rate=0.0437, lr_mask_post_warmup_ratio=0.5)
    Automagic_CameAMP([torch.nn.Parameter(torch.ones(2))], lr_mask_rate=0.0371)
    assert {(0.0437, "cpu"), (0.0437 * 0.5, "cpu"), (0.0371, "cpu")} <= set(lr_mask._FACTORS)


def test_lr_mask_bounds_are_relative_contain_one_and_respect_absolute_limits():
    assert lr_mask.bounds(1e-3, 0.1, 10.0) == (0.1, 10.0)
    # a tiny group lr stays tiny: at most 10x, and a min_lr above it neither lifts it nor fails
    assert lr_mask.bounds(1e-28, 0.1, 10.0, 1e-7, 1e-3) == (1.0, 10.0)
    assert lr_mask.bounds(1e-3, 0.1, 10.0, 1e-7, 1e-3) == (0.1, 1.0)  # max_lr = lr: the mask only lowers
    assert lr_mask.bounds(1e-2, 0.1, 10.0, None, 1e-3) == (0.1, 1.0)  # lr above max_lr is used as given
    assert lr_mask.bounds(1e-4, 0.1, 10.0, 5e-5, 2e-4) == pytest.approx((0.5, 2.0))
    assert lr_mask.bounds(1e-6, 0.1, 10.0, 1e-6, None) == (1.0, 10.0)


def test_lr_mask_rate_from_the_older_absolute_bump():
    assert lr_mask.rate(0.02, None, 1e-3) == 0.02
    assert lr_mask.rate(0.02, 3e-6, 1e-3) == pytest.approx(3e-3)
    assert lr_mask.rate(0.02, 3e-6, 0.0) == 0.0


def test_lr_mask_storage_never_stalls():
    assert lr_mask.storage_dtype(0.02, 0.1, 10.0) == torch.float16
    assert lr_mask.storage_dtype(3e-3, 0.1, 10.0) == torch.float16  # the seeds' bump 3e-6 at lr 1e-3
    assert lr_mask.storage_dtype(1e-5, 0.1, 10.0) == torch.float32
    assert lr_mask.storage_dtype(0.02, 1e-6, 10.0) == torch.float32  # below fp16's normal range
    for r, lo, hi in [(0.02, 0.1, 10.0), (3e-3, 0.1, 10.0), (1e-3, 0.1, 10.0), (0.02, 1e-4, 1e3)]:
        dt = lr_mask.storage_dtype(r, lo, hi)
        for start in (lo * 1.01, 1.0, hi / 1.01):
            mask = torch.full((2,), start, dtype=dt)
            before = mask.clone()
            m32 = mask.float()
            scale_(m32, torch.tensor([1.0, -1.0]), r, lo, hi)
            mask.copy_(m32)
            assert not torch.equal(mask, before), (r, lo, hi, start, dt)


# ------------------------------------------------------------------ ALLoRA
def test_allora_row_scale():
    w = torch.zeros(3, 4)
    w[1] = 1.0
    w[2] = 2.0
    s = allora.row_scale(w, 2.0).reshape(-1)
    assert float(s[0]) == 1.0  # zero row: exactly 1 (kappa = eta)
    assert float(s[1]) > float(s[2])
    assert float(s[1]) == pytest.approx(1 / math.sqrt(1 + 4 * 4))


@pytest.mark.parametrize("threads", [1, 2])
def test_allora_rows_of_a_chunk_scaled_together_match_one_tensor_at_a_time(threads):
    """scale_rows_list_ scales runs of same-shaped tensors with one stacked reduction; the result
    must be the bits of row_scale applied to each selected tensor alone, the others untouched."""
    from library.optimizers.buffer_pool import BufferPool

    shapes = [(8, 32), (8, 32), (32, 8), (32, 8), (32, 8), (8, 32, 1, 1), (300, 200), (300, 200), (5,), (8, 32)]
    selected = [0, 1, 2, 3, 5, 6, 7, 8, 9]  # index 4 is not row-scaled
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(4)
        ws = [torch.randn(s, generator=gen) for s in shapes]
        us = BufferPool().views(ws, "u")
        for u in us:
            u.copy_(torch.randn(u.shape, generator=gen))
        expected = [u.clone() for u in us]
        for i in selected:
            expected[i].mul_(allora.row_scale(ws[i], 3.0))
        allora.scale_rows_list_(us, ws, 3.0, selected)
        for i, (u, e) in enumerate(zip(us, expected)):
            assert torch.equal(u, e), i
    finally:
        torch.set_num_threads(before)




# ------------------------------------------------------------------ non-finite gate and guard
def test_nonfinite_gate_keeps_finite_updates_bit_exact_and_skipped_ones_unchanged():
    from library.optimizers.techniques import momentum_decay, nonfinite

    torch.manual_seed(3)
    ok = torch.tensor([True, False])
    gate = nonfinite.Gate(ok)
    m = torch.randn(2, 64)
    x = torch.randn(2, 64)
    for beta in (0.9, 0.123456789, 0.9995 ** 17):
        plain = [m[0].clone()]
        momentum_decay.momentum_list_(plain, [x[0]], beta)  # a finite tensor: same bits as without the gate
        gated = [m[0].clone(), m[1].clone()]
        momentum_decay.momentum_list_(gated, [x[0], torch.zeros(64)], beta, gate.keeps(beta))
        assert torch.equal(gated[0], plain[0])
        assert torch.equal(gated[1], m[1])  # a skipped tensor (sanitised x = 0) keeps its momentum
    assert float(gate.okf[0]) == 1.0 and float(gate.okf[1]) == 0.0
    assert float(gate.keeps(0.25)[1]) == 1.0 and float(gate.keeps(0.25)[0]) == 0.25


def test_nonfinite_guard_restores_every_dtype_bit_for_bit():
    from library.optimizers.buffer_pool import BufferPool
    from library.optimizers.techniques import nonfinite

    states = [{"codes": torch.randint(-128, 127, (5,), dtype=torch.int8), "row": torch.randn(2), "step": 3},
              {"codes": torch.randint(0, 255, (3,), dtype=torch.uint8), "mask": torch.rand(3).half()}]
    before = [{k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)} for st in states]
    guard = nonfinite.Guard(states, BufferPool(), gated=("mask",))
    for st in states:  # the update scrambles everything, and replaces one tensor object
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                v.copy_(v.flip(0) + 1 if v.is_floating_point() else v.flip(0))
    states[0]["row"] = torch.full((2,), 7.0)
    changed_mask = states[1]["mask"].clone()
    guard.restore(states, torch.tensor([False, True]))
    assert torch.equal(states[0]["codes"], before[0]["codes"]) and torch.equal(states[0]["row"], before[0]["row"])
    assert not torch.equal(states[1]["codes"], before[1]["codes"])  # finite: the update stays
    assert torch.equal(states[1]["mask"], changed_mask)  # gated keys are never copied back


# ------------------------------------------------------------------ multi-tensor ops on flat scratch
@pytest.mark.parametrize("max_runs", [0, 1000], ids=["per-tensor values expanded", "per-tensor values by run"])
def test_ops_on_flat_scratch_give_the_bits_of_foreach(monkeypatch, max_runs):
    """techniques/ops.py runs a multi-tensor operation once on the flat tensor that chunk scratch
    tiles (odd sizes, 0-dim tensors, runs of equal sizes); the result must equal the per-tensor
    torch._foreach_* call bit for bit, including one value per tensor (a vector or 0-dim
    tensors) broadcast over a run or expanded over the elements."""
    from library.optimizers.buffer_pool import BufferPool
    from library.optimizers.techniques import ops

    monkeypatch.setattr(ops, "_MAX_RUNS", max_runs)

    shapes = [(), (3,), (7,), (16, 5), (16, 5), (5, 16), (1,), (33,), (33,), (33,), (4, 4, 3)]
    gen = torch.Generator().manual_seed(0)
    pool = BufferPool()

    def lists():
        xs, ys = pool.views([torch.empty(s) for s in shapes], "x"), pool.views([torch.empty(s) for s in shapes], "y")
        for x, y in zip(xs, ys):
            x.copy_(torch.randn(x.shape, generator=gen) * 3)
            y.copy_(torch.rand(y.shape, generator=gen) + 0.5)
        return xs, ys

    cases = {
        "mul_ scalar": lambda xs, ys: ops.mul_(xs, 0.37),
        "mul_ list": lambda xs, ys: ops.mul_(xs, ys),
        "add_ alpha": lambda xs, ys: ops.add_(xs, ys, alpha=-0.3),
        "sub_": lambda xs, ys: ops.sub_(xs, ys),
        "div_ per tensor": lambda xs, ys: ops.div_(xs, [y.reshape(-1)[0].clone() for y in ys]),
        "mul_ per tensor": lambda xs, ys: ops.mul_(xs, [y.reshape(-1)[0].clone() for y in ys]),
        "add_ per tensor": lambda xs, ys: ops.add_(xs, [y.reshape(-1)[0].clone() for y in ys]),
        "pow_": lambda xs, ys: ops.pow_(xs, 2.0),
        "lerp_": lambda xs, ys: ops.lerp_(xs, ys, 0.1),
        "addcmul_": lambda xs, ys: ops.addcmul_(xs, ys, ys, value=-0.01),
        "addcdiv_": lambda xs, ys: ops.addcdiv_(xs, ys, ys, value=0.5),
        "mul_ per tensor vector": lambda xs, ys: ops.mul_(xs, torch.stack([y.reshape(-1)[0] for y in ys])),
        "lerp_ per tensor": lambda xs, ys: ops.lerp_(xs, ys, torch.stack([y.reshape(-1)[0] - 0.5 for y in ys])),
        "addcmul_ per tensor": lambda xs, ys: ops.addcmul_(xs, ys, [y.reshape(-1)[0].clone() for y in ys], value=-0.3),
        "product_": lambda xs, ys: ops.product_(xs, [y + 1 for y in ys], ys),
        "clamp": lambda xs, ys: (ops.clamp_min_(xs, -1.0), ops.clamp_max_(xs, 1.0)),
        "clamp_": lambda xs, ys: ops.clamp_(xs, -0.7, 1.1),
        "unary": lambda xs, ys: (ops.abs_(xs), ops.sqrt_(xs), ops.exp_(xs), ops.sigmoid_(xs), ops.rsqrt_(xs)),
        "sign_": lambda xs, ys: ops.sign_(xs),
        "positive_": lambda xs, ys: (ops.mul_(xs, 0.0), ops.positive_(xs), ops.sub_(ys, 1.0), ops.positive_(ys),
                                     ops.add_(xs, ys)),
        "copy_": lambda xs, ys: ops.copy_(xs, ys),
        "into_ unary": lambda xs, ys: (ops.into_("abs", xs, ys), ops.into_("sqrt", xs, ys), ops.into_("rsqrt", xs, ys)),
        "into_ clamp_min": lambda xs, ys: ops.into_("clamp_min", xs, ys, 0.9),
        "into_ binary": lambda xs, ys: (ops.mul_(ys, 1.7), ops.into_("mul", xs, ys, ys), ops.into_("sub", ys, xs, xs)),
        "affine_ on signs": lambda xs, ys: (ops.sign_(xs), ops.affine_(xs, 0.0512710963760240, 1.0)),
        "divide_into_": lambda xs, ys: ops.divide_into_(ys, xs),
    }
    for name, op in cases.items():
        xs, ys = lists()
        assert hasattr(xs, "flat") and hasattr(ys, "flat")
        plain_x, plain_y = [x.clone() for x in xs], [y.clone() for y in ys]
        op(xs, ys)  # one operation on the flat tensors
        op(plain_x, plain_y)  # plain lists: torch._foreach_*
        for a, b in zip(xs, plain_x):
            assert torch.equal(a, b), name
        for a, b in zip(ys, plain_y):  # divide_into_ writes its quotient into ys
            assert torch.equal(a, b), name


def test_into_from_a_narrower_dtype_widens_first_as_the_copy_does():
    """ops.into_ with an fp16 source and fp32 outputs must compute in fp32, as copy_ then the
    in-place operation does (out= alone would compute in fp16 and round)."""
    from library.optimizers.buffer_pool import BufferPool
    from library.optimizers.techniques import ops

    pool = BufferPool()
    shapes = [(3, 5), (3, 5), (7,)]
    src = pool.views([torch.empty(s) for s in shapes], "half", torch.float16)
    gen = torch.Generator().manual_seed(5)
    for x in src:
        x.copy_(torch.rand(x.shape, generator=gen) * 3 + 0.1)
    outs = pool.views([torch.empty(s) for s in shapes], "out")
    assert hasattr(src, "flat") and hasattr(outs, "flat")
    ops.into_("rsqrt", outs, src)
    for o, x in zip(outs, src):
        assert torch.equal(o, x.float().rsqrt())
    assert not torch.equal(outs.flat, src.flat.rsqrt().float())  # the fp16 result differs: the test can fail


@pytest.mark.parametrize("threads", [1, 2])
def test_per_tensor_reductions_on_flat_scratch_give_the_bits_of_reducing_each_tensor(threads):
    """ops.sums / ops.norms reduce a run of equal-sized small tensors as one (count, numel) view;
    each value must be the bits of reducing that tensor alone (``x.sum(dtype=float32)``,
    ``torch._foreach_norm``) at any thread count, tensors past torch's one-thread size included."""
    from library.optimizers.buffer_pool import BufferPool
    from library.optimizers.techniques import ops

    sizes = [40000, 40000, 1, 7, 7, 7, 300, 300, 4096, 4096, 4096, 32768, 32768, 65536, 65536, 5, 5]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        xs = BufferPool().views([torch.empty(n) for n in sizes], "x")
        for x in xs:
            x.copy_(torch.randn(x.shape, generator=gen) * 3 + 1)
        assert len(xs.runs) < len(xs)
        plain = [x.clone() for x in xs]
        assert torch.equal(ops.sums(xs), torch.stack([x.sum(dtype=torch.float32) for x in plain]))
        assert torch.equal(ops.norms(xs), torch.stack(torch._foreach_norm(plain)))
        assert torch.equal(ops.sums(plain), ops.sums(xs)) and torch.equal(ops.norms(plain), ops.norms(xs))
    finally:
        torch.set_num_threads(before)


def test_constants_give_the_bits_of_torch_tensor_and_are_made_once():
    from library.optimizers.techniques import constants

    values = [1e-3 * 0.1 * 1.7, 1e-3 / 3, 1e-3 * 0.1 * 1.7, 0.0, 1e-3 / 3, 2.0 ** -149]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(constants.fill_vector(values, dtype, "cpu"), torch.tensor(values, dtype=dtype))
    assert torch.equal(constants.fill_vector([0.25] * 3, torch.float32, "cpu"), torch.full((3,), 0.25))
    xs = [torch.empty(s) for s in ((3, 4), (7,), ())]
    v = constants.size_vector(xs, "t_sqrt", lambda n: math.sqrt(max(n, 1)), torch.float32, "cpu")
    assert torch.equal(v, torch.tensor([math.sqrt(12), math.sqrt(7), 1.0]))
    assert constants.size_vector([torch.empty(12), torch.empty(7), torch.empty(())], "t_sqrt",
                                 lambda n: math.sqrt(max(n, 1)), torch.float32, "cpu") is v  # same sizes: cached
    assert constants.index_vector([2, 0], "cpu") is constants.index_vector((2, 0), "cpu")
