"""AdaptiveHinaAdamW: equivalences, each feature's effect, pairing, seed configs, diagnostics."""
import copy
import math

import pytest
import torch

from benchmarks.shapes import lora_shapes
from library.custom_hina_adaptive_adamw_optimizer import AdaptiveHinaAdamW
from library.toy_tasks import train_lora_teacher
from tests.helpers import quadratic_params, run_quadratic

ALL_OFF = dict(
    use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False, use_grams=False,
    use_agr=False, use_tam=False, use_dynamic_adaptation=False, use_lr_mask=False, use_hypergrad=False, dynamic_weight_decay=False,
)


def _pair(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def test_all_features_off_is_adamw():
    a = quadratic_params(shapes=((16, 8), (8,), (4, 3, 3, 3)))
    b = _pair(a)
    ours = AdaptiveHinaAdamW(a, lr=3e-3, weight_decay=0.05, **ALL_OFF)
    ref = torch.optim.AdamW(b, lr=3e-3, weight_decay=0.05)
    run_quadratic(ours, a, 200)
    run_quadratic(ref, b, 200)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)


def test_hypergrad_scale_follows_the_cosine_of_gradient_and_previous_momentum():
    """Adam with only the hypergradient scale: h_t = clamp(h_{t-1} exp(rate cos(m_{t-1}, g_t))),
    and each step is Adam's step times h_t (checked against a hand-written Adam)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4))
    ref = p.detach().clone()
    rate, lr, b1, b2, eps = 0.5, 1e-2, 0.9, 0.999, 1e-8
    opt = AdaptiveHinaAdamW([p], lr=lr, weight_decay=0.0, **{**ALL_OFF, "use_hypergrad": True, "hypergrad_rate": rate})
    m, v, h = torch.zeros(5, 4), torch.zeros(5, 4), 1.0
    drift = torch.randn(5, 4)
    for t in range(1, 31):
        g = drift + (0.3 if t < 15 else 3.0) * torch.randn(5, 4) * (-1) ** t  # agreement, then noise
        p.grad = g.clone()
        opt.step()
        if t > 1:
            c = float(torch.dot(m.flatten(), g.flatten()) / (m.norm() * g.norm()))
            h = min(max(h * math.exp(rate * c), 0.1), 100.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref -= lr * h * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        assert float(opt.state[p]["lr_scale"]) == pytest.approx(h, rel=1e-4), t
    assert torch.allclose(p.detach(), ref, rtol=1e-4, atol=1e-5)
    assert h > 1.5  # it did grow while the gradients agreed
    assert opt.get_hypergrad_analysis()["geometric_mean"] == pytest.approx(h, rel=1e-4)
    assert opt.diagnostics_scalars()["optimizer/lr_scale_geomean"] == pytest.approx(h, rel=1e-4)


def test_hypergrad_scale_and_mask_stay_within_max_lr():
    """max_lr bounds the product scale x mask (not each factor alone)."""
    p = torch.nn.Parameter(torch.zeros(16))
    plain = torch.nn.Parameter(torch.zeros(16))
    off = {**ALL_OFF, "use_lr_mask": True, "use_hypergrad": True}
    opt = AdaptiveHinaAdamW([p], lr=1e-3, max_lr=4e-3, weight_decay=0.0, warmup_steps=1000, lr_mask_rate=0.2, **off)
    ref = AdaptiveHinaAdamW([plain], lr=1.0, weight_decay=0.0, **ALL_OFF)
    for _ in range(60):  # a constant gradient: every cosine is 1, every element agrees
        before, ref_before = p.detach().clone(), plain.detach().clone()
        p.grad, plain.grad = torch.ones(16), torch.ones(16)
        opt.step()
        ref.step()
        moved, unit = (p.detach() - before).abs(), (plain.detach() - ref_before).abs()
        assert torch.all(moved <= 4e-3 * unit * 1.001)
    assert float(moved.max() / unit.max()) > 3.9e-3  # it did reach max_lr


def test_a_state_saved_before_the_hypergrad_scale_resumes_without_it():
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdaptiveHinaAdamW([p], lr=1e-3)
    p.grad = torch.ones(4)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["use_hypergrad"]  # as written before the option existed
    for st in sd["state"].values():
        del st["lr_scale"]
    again = AdaptiveHinaAdamW([p], lr=1e-3)
    again.load_state_dict(sd)
    assert again.param_groups[0]["use_hypergrad"] is False
    again.step()
    assert "lr_scale" not in again.state[p]
    fresh = AdaptiveHinaAdamW([torch.nn.Parameter(torch.ones(4))], lr=1e-3)
    assert fresh.param_groups[0]["use_hypergrad"] is True  # new optimizers get the default


def test_adopt_matches_official_implementation():
    """Against the authors' package (torch-adopt). pytorch_optimizer's ADOPT differs: it
    decays on the first call and clips with (k+1)^(1/4)."""
    adopt_ref = pytest.importorskip("adopt")
    a = quadratic_params()
    b = _pair(a)
    ours = AdaptiveHinaAdamW(a, lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.01,
                             **{**ALL_OFF, "use_adopt_stability": True})
    ref = adopt_ref.ADOPT(b, lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.01, decouple=True)
    run_quadratic(ours, a, 60)
    run_quadratic(ref, b, 60)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_adopt_first_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AdaptiveHinaAdamW([p], lr=0.1, weight_decay=0.0, **{**ALL_OFF, "use_adopt_stability": True})
    g = torch.tensor([1.0, -2.0, 0.5])
    deltas = []
    for _ in range(3):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        deltas.append(p.detach() - before)
    assert torch.equal(deltas[0], torch.zeros(3))
    assert torch.equal(opt.state[p]["exp_avg_sq"], g * g)
    assert torch.allclose(deltas[1], -0.1 * 0.1 * torch.sign(g))
    assert torch.allclose(deltas[2], -0.1 * 0.19 * torch.sign(g))


def test_grams_step_has_adam_magnitude_and_gradient_sign():
    torch.manual_seed(0)
    p0 = torch.randn(6, 5)
    g1, g2 = torch.randn(6, 5), torch.randn(6, 5)
    out = {}
    for name, extra in (("adam", {}), ("grams", {"use_grams": True})):
        p = torch.nn.Parameter(p0.clone())
        opt = AdaptiveHinaAdamW([p], lr=1e-2, weight_decay=0.0, **{**ALL_OFF, **extra})
        p.grad = g1.clone()
        opt.step()
        before = p.detach().clone()
        p.grad = g2.clone()
        opt.step()
        out[name] = (before, p.detach() - before)
    assert torch.equal(out["adam"][0], out["grams"][0])  # step 1: momentum agrees with g
    d_adam, d_grams = out["adam"][1], out["grams"][1]
    assert torch.allclose(d_grams.abs(), d_adam.abs(), rtol=1e-6)
    assert torch.equal(torch.sign(d_grams), -torch.sign(g2))


def test_cautious_step_one_equals_adam_and_masks_later():
    torch.manual_seed(1)
    p0 = torch.randn(40)
    g1, g2 = torch.randn(40), torch.randn(40)
    res = {}
    for name, extra in (("adam", {}), ("cautious", {"use_cautious": True})):
        p = torch.nn.Parameter(p0.clone())
        opt = AdaptiveHinaAdamW([p], lr=1e-2, weight_decay=0.0, **{**ALL_OFF, **extra})
        p.grad = g1.clone()
        opt.step()
        s1 = p.detach().clone()
        p.grad = g2.clone()
        opt.step()
        res[name] = (s1, p.detach() - s1, opt.state[p]["exp_avg"].clone())
    assert torch.equal(res["adam"][0], res["cautious"][0])
    m = res["adam"][2]
    disagree = (m * g2) <= 0
    assert disagree.any()
    assert torch.all(res["cautious"][1][disagree] == 0)


def test_lr_mask_per_element_no_step1_artefact_and_follows_scheduler():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdaptiveHinaAdamW([p], lr=1e-3, lr_bump=1e-4, min_lr=1e-5, max_lr=1e-2, warmup_steps=100,
                            **{**ALL_OFF, "use_lr_mask": True})
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    opt.step()
    assert torch.equal(opt.state[p]["lr_mask"].float(), torch.ones(4))  # nothing to compare with yet
    p.grad = torch.tensor([1.0, -1.0, -5.0, 5.0])  # 0,1 keep direction; 2,3 flip momentum
    opt.step()
    mask = opt.state[p]["lr_mask"].float()
    assert mask[0] == mask[1] and mask[0] > 1.0
    assert mask[2] == mask[3] and mask[2] < 1.0
    # the scheduler scales the per-element lr: halving group lr halves the step
    q = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    opts = [AdaptiveHinaAdamW([x], lr=1e-3, **{**ALL_OFF, "use_lr_mask": True}) for x in q]
    for step in range(3):
        for x in q:
            x.grad = torch.tensor([1.0, 2.0, -1.0, 0.5])
        before = [x.detach().clone() for x in q]
        opts[1].param_groups[0]["lr"] = 0.5e-3
        for o in opts:
            o.step()
    d0, d1 = (q[0].detach() - before[0]), (q[1].detach() - before[1])
    assert torch.allclose(d1, 0.5 * d0, rtol=1e-5)


def test_dynamic_weight_decay_reaches_floor():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaptiveHinaAdamW([p], lr=0.1, weight_decay=0.5, wd_transition_steps=2, wd_decay_factor=0.5,
                            wd_min_ratio=0.2, **{**ALL_OFF, "dynamic_weight_decay": True})
    shrink = []
    for _ in range(12):
        before = p.detach().clone()
        p.grad = torch.zeros(3)
        opt.step()
        shrink.append(float(1 - p.detach()[0] / before[0]))
    assert shrink[0] == pytest.approx(0.05)  # lr * wd
    assert shrink[-1] == pytest.approx(0.05 * 0.2)  # floor reached and held


def test_spd_anchor_zero_for_adapters_init_for_others():
    down = torch.nn.Parameter(torch.randn(4, 16))
    up = torch.nn.Parameter(torch.zeros(16, 4))
    other = torch.nn.Parameter(torch.randn(16))
    opt = AdaptiveHinaAdamW([("m.lora_down.weight", down), ("m.lora_up.weight", up), ("norm.weight", other)])
    for t in (down, up, other):
        t.grad = torch.randn_like(t)
    opt.step()
    assert "anchor" not in opt.state[down] and "anchor" not in opt.state[up]
    assert "anchor" in opt.state[other]


def test_grad_is_never_mutated_and_bf16_params_work():
    p = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(8, 8))
    opt = AdaptiveHinaAdamW([p, q], use_orthogonal_grad=True)
    for t in (p, q):
        t.grad = torch.randn_like(t)
    g0 = [p.grad.clone(), q.grad.clone()]
    for _ in range(3):
        opt.step()
    assert torch.equal(p.grad, g0[0]) and torch.equal(q.grad, g0[1])
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.isfinite(p.float()).all()


# ------------------------------------------------------------------ pairing
def _lora_params(rank=16, named=True, split=False):
    shapes = lora_shapes(rank)
    params = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in shapes]
    truth = {(2 * i, 2 * i + 1) for i in range(len(params) // 2)}
    if split:
        downs = [x for x in params if "lora_down" in x[0]]
        ups = [x for x in params if "lora_up" in x[0]]
        groups = [{"params": [p for _, p in downs], "lr": 1e-4}, {"params": [p for _, p in ups], "lr": 1.6e-3}]
        if named:
            groups[0]["named"] = [n for n, _ in downs]
            groups[1]["named"] = [n for n, _ in ups]
        n = len(downs)
        truth = {(i, n + i) for i in range(n)}
        return groups, truth
    if named:
        return params, truth
    return [p for _, p in params], truth


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_pairing_precision_recall_on_kohya_lora(named, split):
    params, truth = _lora_params(named=named, split=split)
    opt = AdaptiveHinaAdamW(params, lr=1e-4)
    summary = opt.get_relationship_summary()
    found = {(r["param_index"], r["partner_index"]) for r in summary["relationships"]}
    tp = len(found & truth)
    assert tp / max(len(found), 1) >= 0.99
    assert tp / len(truth) >= 0.99
    assert summary["method"] == ("names" if named else "shapes")
    for r in summary["relationships"][:3]:
        assert r["param_shape"][0] == r["partner_shape"][1]  # rank matches


def test_lora_plus_ratio_not_applied_twice():
    groups, _ = _lora_params(rank=4, split=True)
    opt = AdaptiveHinaAdamW(groups, lora_plus_ratio=16.0)
    assert not opt._ratio  # kohya's LoRA+ split already gave the up factors their own lr
    params, _ = _lora_params(rank=4)
    opt2 = AdaptiveHinaAdamW(params, lora_plus_ratio=16.0)
    assert len(opt2._ratio) == len(params) // 2


def test_importance_refresh_bounded_and_shared_by_partners():
    opt_seen = {}

    def make(named):
        opt = AdaptiveHinaAdamW(named, lr=3e-3, relationship_discovery_interval=10, adaptation_strength=2.0)
        opt_seen["opt"] = opt
        return opt

    train_lora_teacher(make, steps=40)
    opt = opt_seen["opt"]
    factors = {}
    for p, st in opt.state.items():
        f = float(st["lr_factor"])
        assert 0.5 <= f <= 2.0
        factors[opt.param_name(p)] = f
    assert len(set(round(v, 6) for v in factors.values())) > 1  # it differentiates tensors
    for r in opt.get_relationship_summary()["relationships"]:
        assert factors[r["param_name"]] == pytest.approx(factors[r["partner_name"]])


# --------------------------------------------------------- seed 000 configs
GENERAL = {
    'lr': 1e-3, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': 1e-2,
    'use_dynamic_adaptation': True, 'adaptation_strength': 1.0, 'relationship_discovery_interval': 100,
    'importance_decay': 0.95, 'compatibility_threshold': 0.3,
    'use_lr_mask': True, 'lr_bump': 3e-6, 'min_lr': 1e-7, 'max_lr': 1e-3, 'warmup_steps': 500,
    'use_spd': True, 'spd_lambda': 0.06, 'use_cautious': True, 'use_adopt_stability': True, 'use_tam': True,
    'dynamic_weight_decay': True, 'wd_transition_steps': 800, 'wd_decay_factor': 0.75, 'wd_min_ratio': 0.1,
}
LARGE = {
    'lr': 5e-4, 'weight_decay': 5e-3, 'adaptation_strength': 0.8, 'relationship_discovery_interval': 200,
    'importance_decay': 0.98, 'compatibility_threshold': 0.35, 'lr_bump': 1e-6, 'warmup_steps': 1000,
    'use_cautious': True, 'use_adopt_stability': True, 'use_orthogonal_grad': False,
    'wd_transition_steps': 1500, 'wd_decay_factor': 0.8, 'wd_min_ratio': 0.15,
}
SD_LORA = {
    'lr': 8e-4, 'weight_decay': 1e-2, 'adaptation_strength': 1.2, 'relationship_discovery_interval': 150,
    'compatibility_threshold': 0.25, 'lr_bump': 5e-6, 'warmup_steps': 300, 'wd_transition_steps': 600,
    'wd_decay_factor': 0.7, 'wd_min_ratio': 0.1, 'use_spd': True, 'spd_lambda': 0.08, 'use_grams': True, 'use_agr': True,
}
LOW_MEMORY = {
    'lr': 1e-3, 'relationship_discovery_interval': 300, 'compatibility_threshold': 0.4,
    'use_orthogonal_grad': False, 'use_grams': False, 'lr_bump': 1e-6, 'warmup_steps': 200,
    'wd_transition_steps': 500, 'wd_decay_factor': 0.6,
}


@pytest.mark.parametrize("config", [GENERAL, LARGE, SD_LORA, LOW_MEMORY], ids=["general", "large", "sd_lora", "low_memory"])
def test_seed_configs_construct_and_train(config):
    losses, held, _ = train_lora_teacher(lambda named: AdaptiveHinaAdamW(named, **config), steps=300)
    assert held < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"min_lr": 1e-2, "max_lr": 1e-3}, "min_lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"use_lr_mask": "maybe"}, "use_lr_mask"),
        ({"optim_bits": 4}, "optim_bits"),
        ({"tam_beta": 1.0}, "tam_beta"),
        ({"relationship_discovery_interval": 0}, "relationship_discovery_interval"),
    ],
)
def test_bad_values_name_the_argument(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        AdaptiveHinaAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


# -------------------------------------------------- seed 000 snippets, verbatim
def _debug_snippet(optimizer):
    # 獲取優化器詳細信息
    info = optimizer.get_optimization_info()
    print(f"優化器版本: {info['version']}")
    print(f"自適應功能狀態: {info['features']}")
    print(f"訓練統計: {info['training_stats']}")

    # 獲取參數關係摘要
    relationships = optimizer.get_relationship_summary()
    print(f"發現的參數關係: {relationships['total_relationships']}")
    for rel in relationships['relationships'][:3]:  # 顯示前3個關係
        print(f"  {rel['param_shape']} <-> {rel['partner_shape']}, "
              f"相容性: {rel['compatibility']:.3f}")

    # 獲取重要性分析報告
    importance = optimizer.get_importance_analysis()
    print(f"參數總數: {importance['total_parameters']}")
    print(f"高重要性參數: {importance['high_importance_params']}")
    print(f"平均重要性: {importance['importance_statistics']['mean']:.3f}")

    # 獲取 lr_mask 分析
    lr_mask_analysis = optimizer.get_lr_mask_analysis()
    if lr_mask_analysis['lr_mask_enabled']:
        global_stats = lr_mask_analysis['global_statistics']
        print(f"lr_mask 統計:")
        print(f"  總參數: {global_stats['total_parameters']}")
        print(f"  Warmup 中: {global_stats['warmup_parameters']}")
        print(f"  已完成 Warmup: {global_stats['post_warmup_parameters']}")
        print(f"  平均 lr 縮放: {global_stats['avg_lr_scale']:.4f}")

    # 獲取緩衝區池統計
    buffer_stats = optimizer.get_buffer_pool_stats()
    print(f"緩衝區池統計:")
    print(f"  緩衝區類型: {buffer_stats['total_buffer_types']}")
    print(f"  總緩衝區數: {buffer_stats['total_buffers']}")
    print(f"  估計記憶體: {buffer_stats['estimated_memory_mb']:.2f} MB")

    # 訓練結束後清理記憶體
    optimizer.clear_buffer_pool()


def _monitor_snippet(optimizer, step):
    # 每 100 步監控一次優化器狀態
    if step % 100 == 0:
        info = optimizer.get_optimization_info()
        training_stats = info.get('training_stats', {})

        # 監控重要指標
        print(f"步數 {step}:")
        print(f"  發現關係: {training_stats.get('total_relationships', 0)}")
        print(f"  平均重要性: {training_stats.get('avg_importance_score', 0):.3f}")

        # 監控 lr_mask 狀態
        if 'lr_mask_stats' in training_stats:
            lr_stats = training_stats['lr_mask_stats']
            print(f"  lr_mask 平均縮放: {lr_stats.get('avg_lr_scale', 1.0):.4f}")


def test_seed_snippets_run_before_during_after_warmup(capsys):
    holder = {}

    def make(named):
        holder["opt"] = AdaptiveHinaAdamW(named, lr=1e-3, warmup_steps=50, relationship_discovery_interval=25)
        _debug_snippet(holder["opt"])  # before the first step
        return holder["opt"]

    train_lora_teacher(make, steps=30)
    _debug_snippet(holder["opt"])  # mid-warmup
    _monitor_snippet(holder["opt"], 100)
    train_lora_teacher(make, steps=120)
    opt = holder["opt"]
    _debug_snippet(opt)
    _monitor_snippet(opt, 200)
    out = capsys.readouterr().out
    assert "發現的參數關係: 2" in out and "已完成 Warmup: 4" in out
    assert opt.get_buffer_pool_stats()["total_buffers"] == 0  # cleared by the snippet


def test_buffer_pool_reuses_after_first_step():
    params = quadratic_params()
    opt = AdaptiveHinaAdamW(params, use_orthogonal_grad=True)
    run_quadratic(opt, params, 1)
    first = opt.get_buffer_pool_stats()
    assert first["total_buffers"] > 0 and first["estimated_memory_mb"] > 0
    run_quadratic(opt, params, 5)
    later = opt.get_buffer_pool_stats()
    assert later["allocations"] == first["allocations"]
    assert later["reuses"] > first["reuses"]
    opt.clear_buffer_pool()
    assert opt.get_buffer_pool_stats()["total_buffers"] == 0


@pytest.mark.parametrize("named", [True, False])
def test_spd_in_the_optimizer_matches_the_rule(named):
    """Batched (anchor zero, adapters) and per-tensor (init anchor) paths both follow SPD."""
    from library.optimizers.techniques.spd import spd_reference

    outs = {}
    theta = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    g = torch.tensor([[10.0, -1.0], [10.0, -1.0]])  # <g, theta> > 0, yet Adam's step grows ||theta||
    for lam in (0.0, 1.0):
        p = torch.nn.Parameter(theta.clone())
        params = [("m.lora_up.weight", p)] if named else [p]
        opt = AdaptiveHinaAdamW(params, lr=0.1, weight_decay=0.0, spd_lambda=lam,
                                spd_anchor="auto" if named else "zero", **{**ALL_OFF, "use_spd": True})
        p.grad = g.clone()
        opt.step()
        outs[lam] = p.detach().clone()
    assert outs[0.0].norm() > theta.norm()
    ref = spd_reference(theta, outs[0.0], g, torch.zeros_like(theta), 1.0)
    assert torch.allclose(outs[1.0], ref, atol=1e-6)
    assert not torch.allclose(outs[1.0], outs[0.0])


def test_lr_above_max_lr_is_not_silently_capped():
    """max_lr bounds how far the mask raises an element's lr; an lr above it (kohya's LoRA+ up
    group, say) is used as given, and the mask can only lower it."""
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(torch.randn(16, 8))
    opt = AdaptiveHinaAdamW([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-4}], max_lr=1e-3, warmup_steps=50)
    for _ in range(30):
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)  # always agreeing: bumps go up
        opt.step()
    mask_a = opt.state[a]["lr_mask"].float()
    mask_b = opt.state[b]["lr_mask"].float()
    assert torch.all(mask_a == 1.0)  # at lr 1e-2 > max_lr: capped at its own lr, not at 0.1
    assert torch.all(mask_b > 1.0) and torch.all(mask_b <= 10.0)  # below max_lr: grows toward max_lr / lr
