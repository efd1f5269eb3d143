"""HinaAdamWOptimizer: name classification on real networks, per-type rules, seed configs."""
import pytest
import torch

from benchmarks.shapes import lora_shapes
from library.custom_hina_adamw_optimizer import HinaAdamW, HinaAdamWOptimizer
from library.optimizers.params import classify
from library.toy_tasks import train_lora_teacher
from tests.helpers import save_load

OFF = dict(use_spd=False, use_cautious=False, use_adopt_stability=False, use_grams=False, use_agr=False, use_tam=False,
           dynamic_weight_decay=False, weight_decay=0.0)


def _lycoris_params(**kw):
    lycoris = pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork, create_lycoris

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(320, 640), torch.nn.GELU(), torch.nn.Linear(640, 320),
                                torch.nn.Conv2d(8, 16, 3))
    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"]})
    dim = kw.pop("linear_dim", 16)
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=4, conv_dim=dim, conv_alpha=4, **kw)
    net.apply_to()
    return list(net.named_parameters()), net, model


@pytest.mark.parametrize("kw", [
    dict(algo="lokr", factor=-1), dict(algo="lokr", factor=8), dict(algo="lokr", factor=8, decompose_both=True),
    dict(algo="lokr", factor=-1, decompose_both=True), dict(algo="lokr", factor=8, linear_dim=100000),
    dict(algo="loha"), dict(algo="locon"),
], ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_real_lycoris_modules_grouped_without_unpaired_factors(kw):
    named, net, model = _lycoris_params(**dict(kw))
    opt = HinaAdamWOptimizer(named, lr=1e-3)
    diag = opt.diagnose_lora_pairing()
    assert diag["detection"] == "names"
    assert diag["unpaired_count"] == 0, diag["unpaired"]
    adapters = [r for r in diag["parameters"] if r["type"] != "regular"]
    assert len(adapters) == len(named)
    modules = {r["module"] for r in adapters}
    assert len(modules) == 3  # every factor of a module lands in that module's one group
    info = opt.get_optimization_info()
    if kw["algo"] == "lokr":
        assert info["lokr_stats"]["lokr_groups"] == 3 and info["lokr_stats"]["lokr_pairs"] == 3
        w2_side = [p for n, p in named if "lokr_w2" in n]
        assert all(opt._ratio[p] == pytest.approx(16.0 * 0.6) for p in w2_side)
        assert not any(p in opt._ratio for n, p in named if "lokr_w1" in n)
    if kw["algo"] == "locon":
        assert info["lora_stats"] == {"lora_a_params": 3, "lora_b_params": 3, "lora_pairs": 3}
    # it trains
    x = torch.randn(4, 320)
    for _ in range(3):
        opt.zero_grad()
        model[2](torch.nn.functional.gelu(model[0](x))).pow(2).mean().backward()
        model[3](torch.randn(1, 8, 6, 6)).pow(2).mean().backward()
        opt.step()
    net.restore()


def test_kohya_lora_names_and_lora_plus_not_applied_twice():
    shapes = lora_shapes(4)[:20]
    named = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in shapes]
    opt = HinaAdamWOptimizer(named)
    ups = [p for n, p in named if "lora_up" in n]
    assert all(opt._ratio[p] == 16.0 for p in ups) and len(opt._ratio) == len(ups)
    info = opt.get_optimization_info()
    assert info["lora_stats"]["lora_pairs"] == 10
    # kohya's LoRA+ split: up factors in their own group with a higher lr -> no extra ratio
    downs = [(n, p) for n, p in named if "lora_down" in n]
    groups = [{"params": [p for _, p in downs], "named": [n for n, _ in downs], "lr": 1e-4},
              {"params": ups, "named": [n for n, _ in named if "lora_up" in n], "lr": 1.6e-3}]
    split = HinaAdamWOptimizer(groups)
    assert not split._ratio
    assert split.get_optimization_info()["lora_stats"]["lora_pairs"] == 10


def test_peft_names_classify():
    assert classify("base_model.model.q_proj.lora_A.default.weight") == ("base_model.model.q_proj", "lora_down")
    assert classify("base_model.model.q_proj.lora_B.default.weight")[1] == "lora_up"
    assert classify("x.lokr_w2_b") == ("x", "lokr_w2_b")
    assert classify("x.hada_w1_a")[1] == "hada_w1_a"
    assert classify("x.w_norm")[1] == "w_norm"
    assert classify("model.layer.weight") == (None, "other")


def test_without_names_shapes_and_order_are_used_and_reported():
    shapes = lora_shapes(8)[:16]
    params = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
    opt = HinaAdamWOptimizer(params)
    info = opt.get_optimization_info()
    assert info["detection"] == "shapes"
    assert info["lora_stats"]["lora_pairs"] == 8
    assert opt.diagnose_lora_pairing()["unpaired_count"] == 0


def test_kronecker_scale_from_current_norms_and_on_device():
    w1 = torch.nn.Parameter(torch.full((2, 2), 1.0))  # ||w1|| = 2
    w2 = torch.nn.Parameter(torch.full((3, 3), 0.0))
    opt = HinaAdamWOptimizer([("m.lokr_w1", w1), ("m.lokr_w2", w2)], **OFF)
    w1.grad, w2.grad = torch.ones(2, 2), torch.ones(3, 3)
    opt.step()
    assert float(opt._kron_scale[w1]) == pytest.approx(1.0)  # w2 = 0 -> 1/(1+0)
    with torch.no_grad():
        w2.fill_(1.0)  # ||w2|| = 3
    expected = 1 / (1 + 0.3 * float(w1.norm()) * 3.0)  # from the norms before this step
    opt.step()
    assert float(opt._kron_scale[w1]) == pytest.approx(expected, rel=1e-5)
    assert float(opt._kron_scale[w2]) == float(opt._kron_scale[w1])
    assert opt._kron_scale[w1].device == w1.device


def test_allora_rows_finite_when_b_is_zero_and_change_over_time():
    down = torch.nn.Parameter(torch.randn(4, 8))
    up = torch.nn.Parameter(torch.zeros(8, 4))
    opt = HinaAdamWOptimizer([("m.lora_down.weight", down), ("m.lora_up.weight", up)], **OFF)
    for _ in range(3):
        down.grad, up.grad = torch.randn(4, 8), torch.randn(8, 4)
        opt.step()
    assert torch.isfinite(up).all() and up.abs().sum() > 0
    from library.optimizers.techniques.allora import row_scale

    s0 = row_scale(torch.zeros(8, 4), 1.0)
    s1 = row_scale(up.detach(), 1.0)
    assert torch.equal(s0, torch.ones_like(s0)) and (s1 < 1).all()


def test_type_specific_dynamic_weight_decay_floors_reachable():
    kw = dict(wd_transition_steps=10, wd_decay_factor=0.5, wd_min_ratio=0.1)
    lora = torch.nn.Parameter(torch.zeros(4, 2))
    lokr = torch.nn.Parameter(torch.zeros(2, 2))
    reg = torch.nn.Parameter(torch.zeros(3))
    opt = HinaAdamWOptimizer([("a.lora_down.weight", lora), ("b.lokr_w1", lokr), ("norm.weight", reg)],
                             dynamic_weight_decay=True, **kw)
    g = opt.param_groups[0]
    assert opt._wd_multiplier(lora, 10, g) == 1.0
    assert opt._wd_multiplier(lora, 20, g) == pytest.approx(0.5)
    assert opt._wd_multiplier(lora, 10_000, g) == pytest.approx(0.1)
    assert opt._wd_multiplier(lokr, 20, g) == pytest.approx(0.5**0.7)  # gentler
    assert opt._wd_multiplier(lokr, 10_000, g) == pytest.approx(0.15)  # higher floor
    assert opt._wd_multiplier(reg, 10_000, g) == 1.0


def test_grams_and_cautious_both_act():
    from library.optimizers.techniques.grams import grams_cautious_list_

    opt = HinaAdamWOptimizer([torch.nn.Parameter(torch.zeros(3))], use_grams=True)
    assert opt.defaults["use_grams"] and opt.defaults["use_cautious"]
    u = torch.tensor([1.0, -1.0])
    out = [u.clone()]
    grams_cautious_list_(out, out, [torch.tensor([1.0, 1.0])], [torch.empty(2)])
    out = out[0]
    assert torch.allclose(out, torch.tensor([1.5, 0.5]))  # neither a no-op


# ---------------------------------------------------------------- seed configs
SEED_000 = {
    "sd": {'lr': 8e-4, 'alora_ratio': 16.0, 'wd_transition_steps': 800, 'wd_decay_factor': 0.75, 'use_spd': True, 'spd_lambda': 0.06},
    "llm": {'lr': 5e-4, 'alora_ratio': 20.0, 'wd_transition_steps': 1200, 'wd_decay_factor': 0.8, 'use_adopt_stability': True},
    "lokr": {'lr': 1e-3, 'alora_ratio': 18.0, 'wd_transition_steps': 600, 'wd_decay_factor': 0.8, 'wd_min_ratio': 0.18},
}
SEED_002 = {
    "lokr_config": {'lr': 1e-3, 'use_alora': True, 'alora_ratio': 16.0, 'dynamic_weight_decay': True,
                    'wd_transition_steps': 600, 'wd_decay_factor': 0.8, 'wd_min_ratio': 0.18, 'use_spd': True,
                    'spd_lambda': 0.08, 'use_cautious': True, 'use_adopt_stability': True, 'use_tam': True, 'tam_beta': 0.995},
    "sd_lokr_config": {'lr': 8e-4, 'alora_ratio': 16.0, 'wd_transition_steps': 500, 'wd_decay_factor': 0.75,
                       'wd_min_ratio': 0.15, 'use_spd': True, 'spd_lambda': 0.06, 'use_cautious': True, 'use_grams': True},
    "llm_lokr_config": {'lr': 5e-4, 'alora_ratio': 20.0, 'wd_transition_steps': 800, 'wd_decay_factor': 0.85,
                        'wd_min_ratio': 0.20, 'use_spd': True, 'spd_lambda': 0.10, 'use_cautious': True, 'use_adopt_stability': True},
    "experimental_lokr_config": {'lr': 1.2e-3, 'alora_ratio': 22.0, 'wd_transition_steps': 400, 'wd_decay_factor': 0.70,
                                 'wd_min_ratio': 0.12, 'use_spd': True, 'spd_lambda': 0.12, 'use_cautious': True,
                                 'use_orthogonal_grad': True, 'use_grams': True, 'use_agr': True, 'use_tam': True},
}


@pytest.mark.parametrize("config", list({**SEED_000, **SEED_002}.values()), ids=list({**SEED_000, **SEED_002}))
def test_seed_configs_construct_and_train(config):
    losses, held, _ = train_lora_teacher(lambda named: HinaAdamWOptimizer(named, **config), steps=200)
    assert held < 0.5 * losses[0]


def test_seed_002_monitoring_snippet_verbatim(capsys):
    named, net, _ = _lycoris_params(algo="lokr", factor=8)
    optimizer = HinaAdamWOptimizer(named, lr=1e-3)
    # 獲取詳細的 LoKr 統計信息
    opt_info = optimizer.get_optimization_info()

    print("📊 優化器資訊:")
    print(f"  總參數數: {opt_info['total_params']}")

    # LoKr 專用統計
    lokr_stats = opt_info['lokr_stats']
    print(f"\n🔷 LoKr 參數分佈:")
    print(f"  LoKr 組別: {lokr_stats['lokr_groups']}")
    print(f"  配對關係: {lokr_stats['lokr_pairs']}")
    print(f"  W1 參數: {lokr_stats['lokr_w1_params']}")
    print(f"  W2 參數: {lokr_stats['lokr_w2_params']}")
    print(f"  Norm 參數: {lokr_stats['w_norm_params']} (w) + {lokr_stats['b_norm_params']} (b)")

    # 檢查是否成功檢測到 LoKr 參數
    if lokr_stats['lokr_groups'] > 0:
        print("✅ 成功檢測到 LoKr 參數，將應用專門優化策略")
    else:
        print("⚠️  未檢測到 LoKr 參數，請檢查參數命名或模型結構")
    out = capsys.readouterr().out
    assert "LoKr 組別: 3" in out and "✅" in out
    net.restore()


def test_alias_bit_exact_resume_and_no_host_sync():
    from tests.helpers import forbid_host_sync

    assert HinaAdamW is HinaAdamWOptimizer

    def make():
        torch.manual_seed(0)
        ps = [("m.lokr_w1", torch.nn.Parameter(torch.randn(4, 4))), ("m.lokr_w2_a", torch.nn.Parameter(torch.randn(6, 2))),
              ("m.lokr_w2_b", torch.nn.Parameter(torch.zeros(2, 5))), ("n.lora_down.weight", torch.nn.Parameter(torch.randn(2, 7))),
              ("n.lora_up.weight", torch.nn.Parameter(torch.zeros(7, 2)))]
        return ps, HinaAdamWOptimizer(ps, wd_transition_steps=2)

    def grads(ps, k):
        gen = torch.Generator().manual_seed(k)
        for _, p in ps:
            p.grad = torch.randn(p.shape, generator=gen)

    a, oa = make()
    for k in range(8):
        grads(a, k)
        with forbid_host_sync():
            oa.step()
    b, ob = make()
    for k in range(4):
        grads(b, k)
        ob.step()
    c, oc = make()
    with torch.no_grad():
        for (_, x), (_, y) in zip(c, b):
            x.copy_(y)
    oc.load_state_dict(save_load(ob.state_dict()))
    for k in range(4, 8):
        grads(c, k)
        oc.step()
    for (_, x), (_, y) in zip(a, c):
        assert torch.equal(x, y)


def test_shape_fallback_never_pairs_across_lokr_modules():
    named, net, _ = _lycoris_params(algo="lokr", factor=8, decompose_both=True)
    params = [p for _, p in named]
    names = [n for n, _ in named]
    opt = HinaAdamWOptimizer(params)  # no names: shapes and order only
    for r in opt.get_relationship_summary()["relationships"]:
        a, b = names[r["param_index"]], names[r["partner_index"]]
        assert a.split(".")[0] == b.split(".")[0], (a, b)
    net.restore()
