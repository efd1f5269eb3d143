"""Extreme shapes, bad input (property-based) and non-finite data for every registered optimizer."""
import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from library.optimizers import quant8
from library.optimizers.registry import list_optimizers, parse_optimizer_args
from library.train_util import resolve_optimizer
from tests.helpers import forbid_host_copies, forbid_host_sync

NAMES = [info.name for info in list_optimizers()]


def _build(name, params, **kw):
    cls, kwargs, _ = resolve_optimizer(name, {})
    kw = {**kwargs, **kw}
    lr = kw.pop("lr", 1e-4 if name.startswith(("Automagic", "Refactored")) else 1e-3)
    return cls(params, lr=lr, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_shapes_train_and_stay_finite(name):
    torch.manual_seed(0)
    shapes = [(), (1,), (0,), (7,), (3, 5, 2), (4, 3, 3, 3), (16, 4, 1, 1), (1, 1)]
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    nc = torch.nn.Parameter(torch.randn(6, 4).t())  # non-contiguous parameter
    frozen_like = torch.nn.Parameter(torch.randn(5))  # never gets a gradient
    empty_group = [torch.nn.Parameter(torch.randn(3))]  # a group without gradients
    opt = _build(name, [{"params": params + [nc, frozen_like]}, {"params": empty_group}])
    for step in range(4):
        for p in params + [nc]:
            p.grad = torch.randn_like(p) if step % 2 == 0 else torch.zeros_like(p)  # all-zero gradients too
        opt.step()
    for p in params + [nc]:
        assert torch.isfinite(p).all(), (name, tuple(p.shape))
    assert frozen_like not in opt.state and empty_group[0] not in opt.state


@pytest.mark.parametrize("name", NAMES)
def test_thousands_of_zero_gradient_steps_stay_finite(name):
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = _build(name, [p])
    for _ in range(2000):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.isfinite(p).all()


_bad_number = st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(-1.0), st.just(-1e-9),
                        st.text(max_size=3), st.just([1, 2]), st.none())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), key=st.sampled_from(["lr", "eps", "weight_decay", "betas", "warmup_steps"]),
       value=_bad_number)
def test_bad_constructor_values_raise_one_line_value_errors(name, key, value):
    cls, kwargs, _ = resolve_optimizer(name, {})
    import inspect

    if key not in inspect.signature(cls.__init__).parameters and key != "lr":
        return
    if key == "weight_decay" and value is None:
        return
    try:
        cls([torch.nn.Parameter(torch.zeros(3))], **{**kwargs, key: value})
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg
        assert key.split("[")[0] in msg or key.rstrip("s") in msg or "lr" in msg, msg
    except TypeError as e:  # pragma: no cover - a wrong type must still be a clear error
        pytest.fail(f"{name}({key}={value!r}) raised TypeError instead of ValueError: {e}")
    else:
        # accepted: then it must be a legitimate value (None for optional keys; CAME-style eps pairs)
        ok = value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0 and key != "lr")
        ok = ok or (key == "eps" and isinstance(value, list) and all(v > 0 for v in value))
        assert ok, (name, key, value)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), max_size=4))
def test_optimizer_args_parser_never_crashes(items):
    try:
        out = parse_optimizer_args(items)
    except ValueError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(out, dict)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
       scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e6, 3e37]), signed=st.booleans(),
       code=st.sampled_from(["float8", "dynamic"]))
def test_quantiser_round_trip_on_random_shapes(shape, scale, signed, code):
    quantize, dequantize, _ = quant8._codec(code)
    x = torch.randn(shape) * scale
    if not signed:
        x = x.abs()
    codes, absmax = quantize(x, signed=signed)
    y = dequantize(codes, absmax, signed=signed, shape=x.shape)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if x.numel():
        assert float((y - x).abs().max()) <= 0.1 * float(x.abs().max()) + 1e-30


@pytest.mark.parametrize("code", ["float8", "dynamic"])
def test_quantiser_non_finite_input_is_contained_or_rejected(code):
    quantize, dequantize, _ = quant8._codec(code)
    x = torch.tensor([1.0, float("inf"), 2.0] + [0.5] * 300)
    codes, absmax = quantize(x, signed=True)
    y = dequantize(codes, absmax, signed=True, shape=x.shape)
    assert torch.isnan(y[:256]).all() and torch.isfinite(y[256:]).all()  # only the bad block
    with pytest.raises(ValueError):
        quant8.quantize_blockwise(x, signed=True, check_finite=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_toml_configs_never_crash_the_cli(tmp_path_factory, text):
    import argparse

    from library.config_util import parse_with_config
    from library.errors import UserError
    from library.train_args import setup_parser

    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text, encoding="utf-8")
    parser = setup_parser()
    parser.exit = lambda status=0, message=None: (_ for _ in ()).throw(SystemExit(status))
    try:
        args = parse_with_config(parser, ["--config_file", str(path)])
    except UserError as e:
        assert "\n" not in str(e)
    except SystemExit as e:
        assert e.code == 2
    else:
        assert isinstance(args, argparse.Namespace)


# ------------------------------------------------- non-finite gradients inside the optimizer
HINA = ["AdaptiveHinaAdamW", "HinaAdamWOptimizer"]


def _snapshot(opt, p):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items() if k != "step"}


# small tensors: 8-bit codes stay standalone (block padding would cost too much); block-sized ones,
# with two of the same shape apart: the codes sit in arenas, the Automagic family reorders the
# tensors by shape and restores a skipped tensor's codes from one flat copy per arena
_NONFINITE_LAYOUTS = {"small": ((8, 16), (16, 8), (16,), "abv"),
                      "block-sized, reordered": ((16, 32), (16, 32), (256,), "avb")}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("layout", list(_NONFINITE_LAYOUTS))
def test_nonfinite_gradient_skips_that_tensor_and_keeps_its_state(name, bad, layout):
    """Every registered optimizer, 32- and 8-bit: the tensor with a bad gradient and its state stay
    as they were (the Automagic family restores them bit for bit; AdaptiveHinaAdamW's 8-bit state is
    requantised, checked within its rounding), the finite tensor steps, no host sync is needed."""
    torch.manual_seed(0)
    shape_a, shape_b, shape_v, order = _NONFINITE_LAYOUTS[layout]
    a = torch.nn.Parameter(torch.randn(shape_a) * 0.1)
    b = torch.nn.Parameter(torch.randn(shape_b) * 0.1)
    v = torch.nn.Parameter(torch.randn(shape_v) * 0.1)
    opt = _build(name, [{"a": a, "b": b, "v": v}[k] for k in order])
    for _ in range(5):  # past ADOPT's first step, TAM and the lr mask active
        a.grad, b.grad, v.grad = torch.randn_like(a), torch.randn_like(b), torch.randn_like(v)
        opt.step()
    before = {k: t.detach().clone() for k, t in (("a", a), ("b", b), ("v", v))}
    states = {"a": _snapshot(opt, a), "v": _snapshot(opt, v)}
    a.grad, b.grad, v.grad = torch.randn_like(a), torch.randn_like(b), torch.randn_like(v)
    a.grad[3, 5] = bad
    v.grad[2] = bad
    if layout != "small" and name.startswith("Automagic_CameAMP8"):  # the arena path is the one taken
        assert opt.state[a]["exp_avg_f8"]._base is opt.state[b]["exp_avg_f8"]._base is not None
    requantised = "8bit" in name and not name.startswith("Automagic")
    with forbid_host_sync():
        opt.step()
    for key, p in (("a", a), ("v", v)):
        assert torch.equal(p, before[key]), key  # the parameter did not move
        after = _snapshot(opt, p)
        for k, val in states[key].items():
            if requantised and k.endswith(("_f8", "_absmax", "_lq")):
                continue  # requantised with unbiased stochastic rounding: checked below
            if isinstance(val, torch.Tensor):
                assert torch.equal(after[k], val), (key, k)
        if requantised:
            m0, m1 = quant8.load(states[key], "exp_avg"), quant8.load(opt.state[p], "exp_avg")
            assert torch.allclose(m0, m1, rtol=0.1, atol=1e-3 * float(m0.abs().max()))
    assert not torch.equal(b, before["b"]) and torch.isfinite(b).all()  # the finite tensor stepped
    assert opt.nonfinite_skipped() == 2
    assert opt.get_optimization_info()["training_stats"]["nonfinite_skipped"] == 2
    # training continues normally afterwards
    a.grad, b.grad, v.grad = torch.randn_like(a), torch.randn_like(b), torch.randn_like(v)
    opt.step()
    assert not torch.equal(a, before["a"]) and torch.isfinite(a).all() and torch.isfinite(v).all()


AUTOMAGIC_VARIANTS = {
    "early techniques on": dict(use_tam=True, use_grams=True, use_orthograd=True, warmup_steps=40),
    "plain decay with the mask": dict(adaptive_weight_decay=False, warmup_steps=40),
    "after warmup": dict(warmup_steps=2),
}


@pytest.mark.parametrize("variant", list(AUTOMAGIC_VARIANTS))
@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("Automagic")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_automagic_skip_is_exact_on_every_path(name, variant, dtype):
    """The Automagic family gates its element-sized fp32 state and the step instead of copying them:
    each path (TAM, Grams, OrthoGrad, plain decay with the mask, momentum decay after warmup,
    bf16 parameters) must still leave a skipped tensor bit-identical."""
    torch.manual_seed(1)
    ps = [torch.nn.Parameter((torch.randn(*s) * 0.1).to(dtype)) for s in ((8, 16), (16, 8), (16,))]
    opt = _build(name, ps, **AUTOMAGIC_VARIANTS[variant])
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    before = [p.detach().clone() for p in ps]
    states = [_snapshot(opt, p) for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[0].grad[1, 2] = float("nan")
    ps[2].grad[0] = float("inf")
    opt.step()
    for i in (0, 2):
        assert torch.equal(ps[i], before[i]), i
        after = _snapshot(opt, ps[i])
        for k, v in states[i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(after[k], v), (i, k)
    assert not torch.equal(ps[1], before[1])


def test_nonfinite_skip_can_be_switched_off():
    a = torch.nn.Parameter(torch.randn(4, 4))
    opt = _build("AdaptiveHinaAdamW", [a], skip_nonfinite=False, use_adopt_stability=False)
    a.grad = torch.full_like(a, float("nan"))
    opt.step()
    assert torch.isnan(a).all()  # plain AdamW behaviour: NaN propagates
    assert opt.nonfinite_skipped() == 0
    c = torch.nn.Parameter(torch.randn(4, 4))
    opt = _build("Automagic_CameAMP", [c], skip_nonfinite=False)
    c.grad = torch.full_like(c, float("nan"))
    opt.step()
    assert torch.isnan(c).all() and opt.nonfinite_skipped() == 0


@pytest.mark.parametrize("name", HINA + ["Automagic_CameAMP"])
def test_bf16_parameters_stochastic_rounding_tracks_fp32(name):
    """Updates below half a bf16 ulp: round-to-nearest never moves the weights, stochastic
    rounding moves them by the right amount on average; state stays fp32."""
    def run(sr):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        if name.startswith("Automagic"):  # CAME on a constant gradient: u = 1 after the RMS clip
            opt = _build(name, [p], stochastic_rounding=sr, weight_decay=0.0, use_agr=False, use_lr_mask=False,
                         use_adabelief=False, use_orthograd=False, lr=1e-3)
        else:
            extra = dict(use_lr_mask=False, use_dynamic_adaptation=False) if name == "AdaptiveHinaAdamW" else {}
            opt = _build(name, [p], stochastic_rounding=sr, weight_decay=0.0, use_adopt_stability=False,
                         use_spd=False, use_grams=False, use_cautious=False, use_agr=False, use_tam=False,
                         use_hypergrad=False, **extra)
        for _ in range(20):
            p.grad = torch.ones_like(p)  # direction 1 (Adam; CAME's momentum of 1s): each step moves by lr x m
            opt.step()
        assert all(v.dtype in (torch.float32, torch.float16) for v in opt.state[p].values()
                   if isinstance(v, torch.Tensor))
        return p.float()

    nearest, stochastic = run(False), run(True)
    assert torch.equal(nearest, torch.ones_like(nearest))  # lr 1e-3 < half an ulp (2^-8) at 1.0
    expected = 1.0 - 20 * 1e-3 if name in HINA else 1.0 - 1e-3 * sum(1 - 0.9 ** k for k in range(1, 21))
    assert abs(float(stochastic.mean()) - expected) < 2e-3
    assert stochastic.unique().numel() > 1


def test_bf16_stochastic_rounding_is_deterministic_and_resumable():
    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter((torch.randn(64, 8) * 0.1).to(torch.bfloat16))
        return p, _build("AdaptiveHinaAdamW", [p])

    p1, o1 = make()
    p2, o2 = make()
    for step in range(6):
        g = torch.randn(64, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        if step == 2:  # resume the second one from a saved state
            sd = o2.state_dict()
            p3 = torch.nn.Parameter(p2.detach().clone())
            o2 = _build("AdaptiveHinaAdamW", [p3])
            o2.load_state_dict(sd)
            p2 = p3
    assert torch.equal(p1, p2)


# ----------------------------------------------------------- whole-optimizer copies and loads
def _named_lora_params():
    torch.manual_seed(0)
    return [
        ("lora_unet_a.lora_down.weight", torch.nn.Parameter(torch.randn(4, 8))),
        ("lora_unet_a.lora_up.weight", torch.nn.Parameter(torch.randn(8, 4) * 0.01)),
        ("lora_unet_a.alpha_free.weight", torch.nn.Parameter(torch.randn(16))),
    ]


def _copy_by(how, obj):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_optimizer_steps_exactly_as_the_original(name, how):
    """Averaging and keep-the-best scripts deepcopy or torch.save the whole optimizer: the copy must
    step bit-identically (torch's __getstate__ alone would drop the engine's attributes)."""
    named = _named_lora_params()
    opt = _build(name, named)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    named2, opt2 = _copy_by(how, (named, opt))
    assert type(opt2) is type(opt)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for _, p in named]
        for (_, p), (_, q), g in zip(named, named2, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for (n, p), (_, q) in zip(named, named2):
        assert torch.equal(p, q), n
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    for k, entry in sd["state"].items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sd2["state"][k][key]), (k, key)


def test_registered_hooks_are_not_copied_as_torch_does():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = _build("AdaptiveHinaAdamW", [p])
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    twin = copy.deepcopy(opt)
    p.grad = torch.randn(4, 4)
    twin.param_groups[0]["params"][0].grad = torch.randn(4, 4)
    twin.step()
    assert calls == []
    opt.step()
    assert calls == [1]


def test_load_post_hooks_see_the_finished_load():
    """A post-hook runs after the optimizer finished loading: here RefactoredAutomagicCameAMP's config
    is already rebuilt from the saved groups (it used to be rebuilt after the hooks ran)."""
    from library.optimizers.automagic_refactored import OptimizerConfig, RefactoredAutomagicCameAMP

    p = torch.nn.Parameter(torch.randn(8, 8))
    saved = RefactoredAutomagicCameAMP([p], config=OptimizerConfig(weight_decay=0.25))
    p.grad = torch.randn(8, 8)
    saved.step()
    fresh = RefactoredAutomagicCameAMP([p])
    seen = []
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(o.config.weight_decay))
    fresh.load_state_dict(saved.state_dict())
    assert seen == [0.25]


def test_legacy_8bit_lr_mask_is_upgraded_before_the_post_hooks():
    """AdaptiveHinaAdamW 8-bit checkpoints from before the float8 codec hold a log-coded lr mask
    ('lr_mask_lq'); the load converts it, and post-hooks see only the converted state."""
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = _build("AdaptiveHinaAdamW", [p], optim_bits=8)
    p.grad = torch.randn(16, 16)
    opt.step()
    sd = opt.state_dict()
    st = sd["state"][0]
    mask = quant8.load(st, "lr_mask")
    for k in [k for k in st if k.startswith("lr_mask")]:
        del st[k]
    quant8.store_log(st, "lr_mask", mask, lo=0.01, hi=100.0, seed=1)
    assert "lr_mask_lq" in st
    fresh = _build("AdaptiveHinaAdamW", [p], optim_bits=8)
    seen = []
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(sorted(o.state[p])))
    fresh.load_state_dict(sd)
    assert seen and not any(k.startswith("lr_mask_l") for k in seen[0])
    assert torch.allclose(quant8.load(fresh.state[p], "lr_mask"), mask, rtol=0.1)


def test_a_state_value_that_is_not_a_dict_is_refused_in_one_line():
    """Every optimizer here keeps a dict per parameter; anything else is not its checkpoint."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = _build("AdaptiveHinaAdamW", [p], optim_bits=8)
    sd = {"state": {0: torch.zeros(4, 4)}, "param_groups": opt.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match=r"parameter #0 \(4, 4\) is a Tensor, not a dict") as e:
        opt.load_state_dict(sd)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("lr", [1e-9, 3e-3])
def test_refactored_loads_a_state_saved_mid_warmup_or_after_a_raised_lr(lr):
    from library.optimizers.automagic_refactored import RefactoredAutomagicCameAMP

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = RefactoredAutomagicCameAMP([p])
    p.grad = torch.randn(8, 8)
    opt.step()
    opt.param_groups[0]["lr"] = lr  # what a warmup scheduler or a raised lr leaves in the group
    fresh = RefactoredAutomagicCameAMP([p])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("name", [n for n in NAMES if "8bit" in n])
def test_min_lr_zero_trains_with_8bit_state(name):
    """min_lr=0 once failed in the 8-bit log codec (log of 0); the lr bounds are now a scale of the lr."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = _build(name, [p], min_lr=0.0) if name.startswith("Automagic") else _build(name, [p])
    for _ in range(3):
        p.grad = torch.randn(8, 8)
        opt.step()
    assert torch.isfinite(p).all()


def _lora_and_plain_params():
    torch.manual_seed(0)
    named = []
    for i, (fin, fout) in enumerate(((8, 8), (8, 16), (16, 8))):
        named.append((f"lora_unet_b{i}.lora_down.weight", torch.nn.Parameter(torch.randn(4, fin) * 0.1)))
        named.append((f"lora_unet_b{i}.lora_up.weight", torch.nn.Parameter(torch.randn(fout, 4) * 0.01)))
    named.append(("lora_unet_norm.weight", torch.nn.Parameter(torch.randn(16))))
    return named


@pytest.mark.parametrize("name, extra", [(n, {}) for n in NAMES] + [("HinaAdamWOptimizer", {"use_hypergrad": False})],
                         ids=[*NAMES, "HinaAdamWOptimizer-plain_adamw_step"])
def test_no_host_to_device_copy_inside_step_once_the_layout_is_known(name, extra):
    """Once each phase has run (warmup, discovery and importance refreshes, the non-finite guard),
    step() builds no tensor from Python data (on a GPU each would be a synchronous host-to-device
    copy): layout constants are made the first time they are needed, per-step values from a few
    distinct numbers are filled in place. Weight decay differs per parameter type."""
    import inspect

    named = _lora_and_plain_params()
    accepted = inspect.signature(resolve_optimizer(name, {})[0]).parameters
    short = {"warmup_steps": 4, "relationship_discovery_interval": 5, "wd_transition_steps": 6}
    opt = _build(name, named, **{k: v for k, v in short.items() if k in accepted}, **extra)
    for step in range(24):
        for _, p in named:
            p.grad = torch.randn_like(p)
        if step in (9, 19):
            named[0][1].grad[0, 0] = float("nan")
        if step < 12:  # every phase once
            opt.step()
            continue
        with forbid_host_copies(), forbid_host_sync():
            opt.step()
    assert all(torch.isfinite(p).all() for _, p in named)
