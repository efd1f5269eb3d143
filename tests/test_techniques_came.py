"""CAME (techniques/came.py) against its equations and came-pytorch; and the other techniques
the Automagic_CameAMP family adds (AdaBelief residual, momentum decay, AdaDecay, AdEMAMix
slow momentum, the C-Optim context signals, the refactored regularisers)."""
import math

import pytest
import torch

from library.optimizers.techniques import adabelief, adaptive_wd, ademamix, came, context, momentum_decay
from library.optimizers.techniques import regularizers as R

came_pytorch = pytest.importorskip("came_pytorch")

B = (0.9, 0.999, 0.9999)
EPS = (1e-30, 1e-16)


def naive_came(p, grads, lr, betas=B, eps=EPS, clip=1.0, wd=0.0):
    """Independent restatement of the paper's Algorithm (full matrices, explicit formulas)."""
    b1, b2, b3 = betas
    p = p.clone().double()
    factored = p.ndim >= 2
    m = torch.zeros_like(p)
    if factored:
        r = torch.zeros(p.shape[0], dtype=torch.float64)
        c = torch.zeros(p.shape[1], dtype=torch.float64)
        ru, cu = r.clone(), c.clone()
    else:
        v = torch.zeros_like(p)
    for g in grads:
        g = g.double()
        G = g * g + eps[0]
        if factored:
            r = b2 * r + (1 - b2) * G.mean(1)
            c = b2 * c + (1 - b2) * G.mean(0)
            V = torch.outer(r, c) / r.mean()
        else:
            v = b2 * v + (1 - b2) * G
            V = v
        u = g / V.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()) / clip)
        m = b1 * m + (1 - b1) * u
        if factored:
            U = (u - m) ** 2 + eps[1]
            ru = b3 * ru + (1 - b3) * U.mean(1)
            cu = b3 * cu + (1 - b3) * U.mean(0)
            s = m / (torch.outer(ru, cu) / ru.mean()).sqrt()
        else:
            s = m
        p = p * (1 - lr * wd) - lr * s
    return p


@pytest.mark.parametrize("shape", [(6, 4), (9,), (1, 7), (5, 1)])
def test_matches_its_equation(shape):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * (0.5 + i % 3) for i in range(12)]
    p, st = p0.clone(), {}
    for g in grads:
        came.reference_step(p, g, st, lr=1e-2, weight_decay=0.1)
    assert torch.allclose(p.double(), naive_came(p0, grads, 1e-2, wd=0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 5), (7,), (16, 3)])
def test_matches_came_pytorch(shape):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(shape, generator=gen)
    ours = p0.clone()
    ref = torch.nn.Parameter(p0.clone())
    opt = came_pytorch.CAME([ref], lr=3e-3, weight_decay=0.05)
    st = {}
    for i in range(40):
        g = torch.randn(shape, generator=gen) + 0.2
        came.reference_step(ours, g, st, lr=3e-3, weight_decay=0.05)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(ours, ref.detach(), rtol=1e-5, atol=1e-6)


def test_first_move_is_11_lr_on_a_matrix_without_correction():
    lr, c = 1e-3, 0.37
    p0 = torch.randn(6, 5)
    p = p0.clone()
    came.reference_step(p, torch.full((6, 5), c), {}, lr=lr)
    expected = (1 - B[0]) / (B[0] * math.sqrt(1 - B[2]))  # 11.11
    assert expected == pytest.approx(11.111, rel=1e-3)
    assert torch.allclose(p0 - p, torch.full((6, 5), expected * lr), rtol=1e-4)
    # with weight decay, lr * wd * p comes first
    p = p0.clone()
    came.reference_step(p, torch.full((6, 5), c), {}, lr=lr, weight_decay=0.1)
    assert torch.allclose(p0 - p, expected * lr + lr * 0.1 * p0, rtol=1e-4, atol=1e-7)


def test_first_move_is_0p1_lr_on_a_vector():
    lr = 1e-3
    g = torch.tensor([0.5, -2.0, 3.0, -0.1])
    p = torch.zeros(4)
    came.reference_step(p, g, {}, lr=lr)
    assert torch.allclose(p, -0.1 * lr * torch.sign(g), rtol=1e-5)


def test_bias_correction_makes_matrices_and_vectors_start_alike():
    lr = 1e-3
    p = torch.zeros(6, 5)
    came.reference_step(p, torch.full((6, 5), -0.2), {}, lr=lr, bias_correction=True)
    assert torch.allclose(p, torch.full((6, 5), (1 - B[0]) / B[0] * lr), rtol=1e-4)  # 0.111 lr
    # a rank-1 g^2 with mixed signs and magnitudes: still (1 - b1)/b1 lr per element
    a, b = torch.tensor([1.0, -3.0, 0.5]), torch.tensor([2.0, -0.1, 1.0, 4.0])
    g = torch.outer(a, b)
    p = torch.zeros(3, 4)
    came.reference_step(p, g, {}, lr=lr, bias_correction=True)
    assert torch.allclose(p, -(1 - B[0]) / B[0] * lr * torch.sign(g), rtol=1e-4)
    v = torch.zeros(4)
    came.reference_step(v, torch.tensor([1.0, -2.0, 0.3, 9.0]), {}, lr=lr, bias_correction=True)
    assert torch.allclose(v.abs(), torch.full((4,), (1 - B[0]) * lr), rtol=1e-4)


def test_factored_second_moment_is_exact_for_rank1_squares():
    gen = torch.Generator().manual_seed(2)
    col = torch.rand(7, generator=gen) + 0.1  # fixed column profile: every G_t = a_t col^T
    st = came.init_state(torch.zeros(5, 7))
    full = torch.zeros(5, 7, dtype=torch.float64)
    for t in range(6):
        a = torch.rand(5, generator=gen) + 0.1
        g = torch.sqrt(torch.outer(a, col)) * torch.where(torch.rand(5, 7, generator=gen) > 0.5, 1.0, -1.0)
        sq = g * g
        approx = torch.empty(5, 7)
        came.factored_list_([st["came_row"]], [st["came_col"]], [sq], [approx], 0.9)
        full = 0.9 * full + 0.1 * sq.double()
    approx = 1.0 / approx.double() ** 2
    assert torch.allclose(approx, full, rtol=1e-5)
    # and not exact for a general (rank > 1) square
    st2 = came.init_state(torch.zeros(5, 7))
    sq = torch.rand(5, 7, generator=gen) ** 4
    approx2 = torch.empty(5, 7)
    came.factored_list_([st2["came_row"]], [st2["came_col"]], [sq], [approx2], 0.0)
    approx2 = 1.0 / approx2 ** 2
    assert not torch.allclose(approx2, sq, rtol=1e-2)


def test_factored_statistics_update_as_one_batch_when_back_to_back_and_one_by_one_when_not():
    """A run of same-shape tensors is one batch: statistics lying back to back (an arena) are
    updated in place through one view, scattered ones one tensor at a time. Both give the bits
    of updating each tensor alone, over several steps."""
    gen = torch.Generator().manual_seed(5)
    n, k, count = 6, 10, 3
    sqs = [torch.rand(count, n, k, generator=gen) for _ in range(3)]
    arena_r, arena_c = torch.zeros(count * n), torch.zeros(count * k)
    packed = ([arena_r[i * n:(i + 1) * n] for i in range(count)], [arena_c[i * k:(i + 1) * k] for i in range(count)])
    scattered = ([torch.zeros(n) for _ in range(count)], [torch.zeros(k) for _ in range(count)])
    alone = [([torch.zeros(n)], [torch.zeros(k)]) for _ in range(count)]
    for sq in sqs:
        outs = [torch.empty(count, n, k) for _ in range(2)]
        for (rows, cols), out in zip((packed, scattered), outs):
            came.factored_list_(rows, cols, list(sq.unbind(0)), list(out.unbind(0)), 0.9, scale=0.5)
        for i, (rows, cols) in enumerate(alone):
            one = torch.empty(n, k)
            came.factored_list_(rows, cols, [sq[i]], [one], 0.9, scale=0.5)
            assert torch.equal(one, outs[0][i]) and torch.equal(one, outs[1][i])
    for i, (rows, cols) in enumerate(alone):
        for stats in (packed, scattered):
            assert torch.equal(stats[0][i], rows[0]) and torch.equal(stats[1][i], cols[0])
    assert arena_r.abs().sum() > 0 and torch.equal(arena_r[n:2 * n], packed[0][1])  # updated in place


def test_conv_weights_are_flattened_to_out_by_in_k_k():
    assert came.matrix_shape((8, 4, 3, 3)) == (8, 36)
    assert came.matrix_shape((16, 320, 1, 1)) == (16, 320)
    assert came.matrix_shape((2, 5, 6)) == (2, 30)  # leading dims are not batch dims here
    assert came.matrix_shape((7,)) is None
    conv = torch.zeros(16, 320, 1, 1)
    st = came.init_state(conv)
    assert st["came_row"].numel() == 16 and st["came_col"].numel() == 320
    # official CAME keeps (16, 320, 1)-sized row statistics for the same 1x1 conv
    ref = torch.nn.Parameter(conv.clone())
    opt = came_pytorch.CAME([ref], lr=1e-3)
    ref.grad = torch.randn_like(ref)
    opt.step()
    official = sum(v.numel() for k, v in opt.state[ref].items() if isinstance(v, torch.Tensor) and ("sq" in k or "res" in k))
    ours = sum(v.numel() for v in st.values())
    assert ours == 2 * (16 + 320) and official >= 4 * 16 * 320
    # a 1x1-conv LoRA factor updates exactly like the equivalent Linear factor
    gen = torch.Generator().manual_seed(3)
    lin = torch.randn(16, 320, generator=gen)
    cv = lin.clone().view(16, 320, 1, 1)
    s_lin, s_cv = {}, {}
    for _ in range(5):
        g = torch.randn(16, 320, generator=gen)
        came.reference_step(lin, g, s_lin, lr=1e-2)
        came.reference_step(cv, g.view(16, 320, 1, 1), s_cv, lr=1e-2)
    assert torch.equal(lin, cv.view(16, 320))


def test_zero_rows_and_zero_gradients_stay_finite():
    g = torch.randn(6, 4)
    g[2] = 0.0  # an unused embedding row
    p, st = torch.randn(6, 4), {}
    for _ in range(3):
        came.reference_step(p, g, st, lr=1e-3)
    assert torch.isfinite(p).all()
    q, st2 = torch.randn(5), {}
    came.reference_step(q, torch.zeros(5), st2, lr=1e-3)
    assert torch.isfinite(q).all()


def test_rms_clip_and_confidence_use_updated_momentum():
    u = torch.full((4, 4), 3.0)
    came.rms_clip_list_([u], 1.0)
    assert torch.allclose(u, torch.ones(4, 4))
    u = torch.full((4, 4), 0.5)
    came.rms_clip_list_([u], 1.0)
    assert torch.allclose(u, torch.full((4, 4), 0.5))  # never scaled up
    st = came.init_state(torch.zeros(3, 3))
    u, m = torch.randn(3, 3), torch.randn(3, 3)
    out = torch.empty(3, 3)
    came.confidence_list_([u], [m], [st], 0.0, 1e-16, [out])
    U = (u - m) ** 2 + 1e-16
    approx = torch.outer(U.mean(1), U.mean(0)) / U.mean(1).mean()
    assert torch.allclose(out, m / approx.sqrt(), rtol=1e-5)


# ------------------------------------------------------------ AdaBelief residual
def test_adabelief_residual_equation_and_vectors_in_came():
    x, m = torch.randn(6), torch.randn(6)
    s = torch.zeros(6)
    res, d = torch.empty(6), torch.empty(6)
    adabelief.residual_list_([res], [x], [m], 1e-16)
    adabelief.update_residual_list_([s], [res], 0.9)
    assert torch.allclose(s, 0.1 * ((x - m) ** 2 + 1e-16))
    adabelief.direction_list_([d], [m], [s], math.sqrt(0.1))
    assert torch.allclose(d, m / (x - m).abs(), rtol=1e-4)
    # unfactored confidence: official (no residual) gives s = m; with it, m / sqrt(res)
    st = came.init_state(torch.zeros(6))
    assert "came_res" not in st
    out = torch.empty(6)
    came.confidence_list_([x], [m], [st], 0.9, 1e-16, [out])
    assert torch.equal(out, m)
    st = came.init_state(torch.zeros(6), confidence_full=True)
    came.confidence_list_([x], [m], [st], 0.9, 1e-16, [out], bc3=math.sqrt(0.1))
    assert torch.allclose(out, m / (x - m).abs(), rtol=1e-4)


# ------------------------------------------------------------ momentum decay
def test_momentum_decay_schedule():
    assert momentum_decay.beta_at(0.8, 0.9995, 0.4, 0) == 0.8
    assert momentum_decay.beta_at(0.8, 0.9995, 0.4, 100) == pytest.approx(0.8 * 0.9995**100)
    assert momentum_decay.beta_at(0.8, 0.9995, 0.4, 10_000) == 0.4
    assert momentum_decay.beta_at(0.3, 0.9995, 0.4, 50) == 0.3  # floor never raises beta
    m = torch.ones(3)
    momentum_decay.momentum_list_([m], [torch.zeros(3)], 0.25)
    assert torch.allclose(m, torch.full((3,), 0.25))


# ------------------------------------------------------------ AdaDecay
def test_adadecay_factor_equation_and_guards():
    g = torch.tensor([0.0, 1.0, -2.0, 3.0, -0.5])
    a = g.abs()
    z = (a - a.mean()) / a.std(correction=0)
    out = torch.empty(5)
    adaptive_wd.factor_list_([out], [g], 4.0)
    out = 2 * out
    assert torch.allclose(out, 2 * torch.sigmoid(4 * z), atol=1e-6)
    assert out.argmax() == 3 and out.argmin() == 0 and bool(((out > 0) & (out < 2)).all())
    for flat in (torch.full((4,), -0.7), torch.zeros(3, 3), torch.tensor([5.0])):
        f = torch.empty_like(flat)
        adaptive_wd.factor_list_([f], [flat], 4.0)
        assert torch.equal(2 * f, torch.ones_like(flat))


# ------------------------------------------------------------ AdEMAMix slow momentum
def test_slow_momentum_mix_normalised():
    assert ademamix.alpha_at(2.0, 5, 10) == 1.0 and ademamix.alpha_at(2.0, 50, 10) == 2.0
    m1, m2 = torch.full((3,), 1.0), torch.full((3,), 4.0)
    out = torch.empty(3)
    ademamix.mix_list_([out], [m1], [m2], 2.0)
    assert torch.allclose(out, torch.full((3,), 3.0))
    ademamix.mix_list_([out], [m1], [m2], 0.0)
    assert torch.equal(out, m1)
    x = torch.full((3,), 2.0)
    a, b = torch.zeros(3), torch.zeros(3)
    for _ in range(400):
        momentum_decay.momentum_list_([a], [x], 0.99)  # the slow EMA
        momentum_decay.momentum_list_([b], [x], 0.9)
    ademamix.mix_list_([out], [b], [a], 1.0)
    assert torch.allclose(out, x, rtol=0.02)  # consistent x: same scale


# ------------------------------------------------------------ C-Optim context
CFG = dict(context.DEFAULTS, lr_multiplier_bounds=(0.5, 2.0))  # room to cut: the mechanism under test


def test_context_multiplier_follows_consistency_within_bounds():
    ctx = context.init(8, "cpu")
    assert float(context.update_multiplier(ctx, CFG)) == 1.0  # nothing observed yet
    for _ in range(60):
        context.observe_gradient(ctx, torch.tensor(1.0), CFG)
        context.update_multiplier(ctx, CFG)
        context.observe_consistency(ctx, torch.tensor(0.9))
    assert float(ctx["mult"]) == pytest.approx(CFG["lr_multiplier_bounds"][1])
    for _ in range(200):
        context.observe_gradient(ctx, torch.tensor(1.0), CFG)
        context.update_multiplier(ctx, CFG)
        context.observe_consistency(ctx, torch.tensor(-0.9))
    assert float(ctx["mult"]) == pytest.approx(CFG["lr_multiplier_bounds"][0])


def test_context_gradient_spike_cuts_the_multiplier():
    ctx = context.init(8, "cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        context.observe_gradient(ctx, 1.0 + 0.05 * torch.rand((), generator=gen), CFG)
        context.update_multiplier(ctx, CFG)
        context.observe_consistency(ctx, torch.tensor(0.3))
    before = float(ctx["mult"])
    mean_before = float(ctx["gn_mean"])
    context.observe_gradient(ctx, torch.tensor(100.0), CFG)
    assert float(ctx["grad_spike"]) == 1.0
    assert float(context.update_multiplier(ctx, CFG)) < 0.6 * before
    assert float(ctx["gn_mean"]) == pytest.approx(mean_before)  # the spike does not poison the statistics
    context.observe_gradient(ctx, torch.tensor(float("nan")), CFG)
    assert float(ctx["grad_spike"]) == 1.0 and math.isfinite(float(ctx["gn_mean"]))


def test_context_loss_spike_plateau_and_stagnation():
    cfg = dict(CFG, stagnation_steps=5)
    ctx = context.init(10, "cpu")
    for i in range(10):
        context.observe_loss(ctx, torch.tensor(1.0 - 0.05 * i), cfg)  # improving
    assert float(ctx["loss_plateau"]) == 0.0
    context.observe_loss(ctx, torch.tensor(50.0), cfg)
    assert float(ctx["loss_spike"]) == 1.0
    ctx2 = context.init(10, "cpu")
    for i in range(10):
        context.observe_loss(ctx2, torch.tensor(0.5 + 0.001 * (i % 2)), cfg)  # flat
    assert float(ctx2["loss_plateau"]) == 1.0 and float(ctx2["loss_spike"]) == 0.0
    context.observe_consistency(ctx2, torch.tensor(cfg["consistency_ref"]))
    mults = []
    for _ in range(12):
        context.observe_gradient(ctx2, torch.tensor(1.0), cfg)
        mults.append(float(context.update_multiplier(ctx2, cfg)))
    assert float(ctx2["stagnation"]) == 1.0 and int(ctx2["stagnant"]) == 12
    assert mults[3] == pytest.approx(1.0) and mults[-1] > 1.05  # boosted once stagnation is declared
    assert context.summary(ctx2)["losses_reported"] == 10


# ------------------------------------------------------------ refactored regularisers
def test_regulariser_shape_rules():
    assert R.is_spatial((8, 4, 3, 3)) and R.is_spatial((4, 5, 5))
    assert not R.is_spatial((16, 320, 1, 1)) and not R.is_spatial((16, 320)) and not R.is_spatial((9,))
    assert R.lowrank_view((16, 320)) == (16, 320) and R.lowrank_view((8, 4, 3, 3)) == (8, 36)
    assert R.lowrank_view((1, 30)) is None and R.lowrank_view((30,)) is None


def test_edge_and_frequency_leave_flat_kernels_alone_and_damp_checkerboards():
    flat = torch.ones(4, 2, 3, 3) * torch.randn(4, 2, 1, 1)
    assert torch.allclose(R.edge_suppress_(flat.clone(), 0.6, 0.5, 0.0), flat)
    assert torch.allclose(R.frequency_penalty_(flat.clone(), 0.5, 0.0), flat, atol=1e-6)
    ramp = torch.arange(3.0).view(1, 1, 1, 3).expand(2, 2, 3, 3).contiguous()
    # interior of a linear ramp has no Laplacian; replicate padding keeps rows constant across
    checker = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]).expand(2, 2, 3, 3).contiguous()
    damped = R.frequency_penalty_(checker.clone(), 0.5, 0.0)
    assert damped.norm() < 0.8 * checker.norm()
    e = R.edge_suppress_(checker.clone(), 0.6, 0.5, 0.8)
    assert (e.abs() <= checker.abs()).all() and (e.abs() >= 0.8 * checker.abs() - 1e-6).all() and not torch.equal(e, checker)
    assert torch.isfinite(R.edge_suppress_(ramp.clone(), 0.6, 0.5, 0.0)).all()


def test_matrix_form_equals_direct_fft_and_conv():
    g = torch.randn(3, 5, 4, 4)
    old = R.MATRIX_MAX
    try:
        a = (R.edge_suppress_(g.clone(), 0.3, 0.4, 0.0), R.frequency_penalty_(g.clone(), 0.3, 0.2))
        R.MATRIX_MAX = 0
        b = (R.edge_suppress_(g.clone(), 0.3, 0.4, 0.0), R.frequency_penalty_(g.clone(), 0.3, 0.2))
    finally:
        R.MATRIX_MAX = old
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)


def test_spatial_awareness_and_background():
    g = torch.randn(6, 3, 3, 3)
    g[0, 0] *= 10.0  # one very spiky kernel
    out = R.spatial_awareness_(g.clone(), 1.0, 0.8)
    ratio = (out / g).reshape(18, 9)[:, 0]
    assert float(ratio[0]) == pytest.approx(0.8) and float(ratio.max()) <= 1.0
    g = torch.ones(6, 3, 3, 3) * (1.0 + torch.rand(6, 3, 1, 1))
    g[5] *= 0.01  # quiet kernels: background
    bg = R.background_(g.clone(), 0.1, 0.5)
    r2 = (bg / g).reshape(6, 3, 9)[:, :, 0]
    assert torch.allclose(r2[5], torch.full((3,), 0.5)) and torch.allclose(r2[1], torch.ones(3))


def test_tail_operator_exact_and_randomized():
    gen = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(40, 4, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(12, 4, generator=gen))
    w = u @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0])) @ v.T  # (40, 12), sigma = 4, 2, 1, 0
    op = R.tail_operator(w)
    assert "P" in op and op["P"].shape == (12, 12) and op["left"] is False
    tail = R.apply_tail(op, w)
    expected = u @ torch.diag(torch.tensor([0.0, 0.5 * 2.0, 0.75 * 1.0, 1.0 * 0.0])) @ v.T  # w_i sigma_i
    assert torch.allclose(tail, expected, atol=1e-4)
    assert torch.equal(R.apply_tail(R.tail_operator(torch.zeros(5, 3)), torch.zeros(5, 3)), torch.zeros(5, 3))
    big = torch.randn(300, 20, generator=gen) @ torch.randn(20, 400, generator=gen)
    op2 = R.tail_operator(big, max_dim=64, rank=20, generator=torch.Generator().manual_seed(0))
    assert "U" in op2 and op2["U"].shape == (300, 20)
    assert R.apply_tail(op2, big).norm() < 1e-3 * big.norm()  # rank 20 captured: no tail left
    again = R.tail_operator(big, max_dim=64, rank=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["U"], op2["U"])  # seeded: deterministic
