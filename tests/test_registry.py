"""get_optimizer / registry: names, aliases, dotted paths, argument parsing, bad input."""
import argparse
import subprocess
import sys

import pytest
import torch

from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
from library.optimizers.registry import list_optimizers, lookup, parse_optimizer_args
from library.train_util import get_optimizer, resolve_optimizer


def args(opt_type, *opt_args, lr=1e-3, **extra):
    return argparse.Namespace(optimizer_type=opt_type, optimizer_args=list(opt_args), learning_rate=lr, **extra)


def params():
    lin = torch.nn.Linear(4, 3)
    return list(lin.parameters())


@pytest.mark.parametrize("name", ["AdaptiveHinaAdamW", "adaptivehinaadamw", "ADAPTIVEHINAADAMW", "HinaAdaptiveAdamW8bit"])
def test_our_names_case_insensitive_and_aliases(name):
    opt_name, _, opt = get_optimizer(args(name), params())
    assert isinstance(opt, AdaptiveHinaAdamW)
    assert opt_name == "library.optimizers.adaptive_hina.AdaptiveHinaAdamW"
    assert opt.param_groups[0]["lr"] == 1e-3


def test_dotted_path_and_torch_fallback_and_builtins():
    _, _, opt = get_optimizer(args("library.custom_hina_adaptive_adamw_optimizer.AdaptiveHinaAdamW"), params())
    assert isinstance(opt, AdaptiveHinaAdamW)
    _, _, opt = get_optimizer(args("Adagrad"), params())
    assert isinstance(opt, torch.optim.Adagrad)
    _, _, opt = get_optimizer(args("adamw", "weight_decay=0.1", "betas=0.9,0.99"), params())
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    _, _, opt = get_optimizer(args("SGDNesterov"), params())
    assert opt.param_groups[0]["nesterov"] is True
    _, _, opt = get_optimizer(args(None), params())
    assert isinstance(opt, torch.optim.AdamW)


def test_bitsandbytes_names_still_work():
    pytest.importorskip("bitsandbytes")
    _, _, opt = get_optimizer(args("AdamW8bit"), params())
    assert type(opt).__name__ == "AdamW8bit"


def test_8bit_alias_does_not_import_bitsandbytes():
    code = (
        "import sys, argparse, torch\n"
        "from library.train_util import get_optimizer\n"
        "a = argparse.Namespace(optimizer_type='HinaAdaptiveAdamW8bit', optimizer_args=[], learning_rate=1e-3)\n"
        "get_optimizer(a, [torch.nn.Parameter(torch.zeros(2))])\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".", check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_parse_optimizer_args():
    parsed = parse_optimizer_args([
        "betas=0.9,0.99", "eps=(1e-30,1e-16)", "decouple=True", "flag=false", "x=None", "mode=fast",
        "mode2='slow'", "expr=a=b", "n=3", "lr= 1e-4 ",
    ])
    assert parsed == {
        "betas": (0.9, 0.99), "eps": (1e-30, 1e-16), "decouple": True, "flag": False, "x": None, "mode": "fast",
        "mode2": "slow", "expr": "a=b", "n": 3, "lr": 1e-4,
    }
    for bad in (["novalue"], ["=3"], ["bad key=1"], [3]):
        with pytest.raises(ValueError):
            parse_optimizer_args(bad)


def test_unknown_key_names_closest_match_and_accepted_keys():
    with pytest.raises(ValueError) as e:
        get_optimizer(args("AdaptiveHinaAdamW", "use_lr_msk=True"), params())
    msg = str(e.value)
    assert "use_lr_msk" in msg and "did you mean 'use_lr_mask'" in msg and "warmup_steps" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad, culprit", [("lr=-1", "lr"), ("betas=0.9,1.5", "betas"), ("eps=0", "eps"),
                                         ("warmup_steps=abc", "warmup_steps"), ("lr_mask_floor=2", "lr_mask_floor")])
def test_bad_values_are_one_line_errors(bad, culprit):
    a = args("AdaptiveHinaAdamW", bad, lr=None) if bad.startswith("lr=") else args("AdaptiveHinaAdamW", bad)
    with pytest.raises(ValueError, match=culprit):
        get_optimizer(a, params())


def test_unknown_optimizer_lists_known_names():
    with pytest.raises(ValueError, match="unknown optimizer type 'Nope'.*AdaptiveHinaAdamW"):
        resolve_optimizer("Nope")
    with pytest.raises(ValueError, match="cannot import optimizer module"):
        resolve_optimizer("no_such_module.Thing")


def test_registry_table_is_consistent():
    infos = list_optimizers()
    assert infos and all(lookup(i.name) is i for i in infos)
    for info in infos:
        cls = info.load()
        assert issubclass(cls, torch.optim.Optimizer)
        for alias in info.aliases:
            assert lookup(alias.upper()) is info


def test_param_names_pass_through_groups():
    lin = torch.nn.Linear(4, 3)
    groups = [{"params": [lin.weight, lin.bias], "named": ["a.lora_down.weight", "a.bias"], "lr": 1e-4}]
    _, _, opt = get_optimizer(args("AdaptiveHinaAdamW"), groups)
    assert opt.param_name(lin.weight) == "a.lora_down.weight"
    # torch optimizers ignore the extra key
    _, _, opt = get_optimizer(args("AdamW"), [{"params": [lin.weight], "named": ["w"], "lr": 1e-4}])
    assert opt.param_groups[0]["lr"] == 1e-4


# --------------------------------------------------- per-group lrs and schedulers
def _adapter_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    named = [("m.lora_down.weight", torch.randn(4, 16, generator=gen) * 0.1),
             ("m.lora_up.weight", torch.randn(16, 4, generator=gen) * 0.1),
             ("n.weight", torch.randn(8, 8, generator=gen))]
    return [(n, torch.nn.Parameter(t)) for n, t in named]


def _build(info, named, lr):
    cls = info.load()
    kw = dict(info.defaults)
    return cls([{"params": [p for _, p in named], "named": [n for n, _ in named], "lr": lr}], lr=lr, **kw)


def _grads(named, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) + 0.5 for _, p in named]


@pytest.mark.parametrize("info", list_optimizers(), ids=lambda i: i.name)
def test_a_schedulers_lr_reaches_every_optimizer(info):
    """Two identical optimizers step identically until a scheduler halves one's lr: that step
    moves its parameters by half as much (decay, lr mask and SPD all scale with the lr)."""
    a, b = _adapter_model(), _adapter_model()
    opt_a, opt_b = _build(info, a, 1e-3), _build(info, b, 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 if s < 6 else 0.5)
    for step in range(7):
        before = [p.detach().clone() for _, p in a], [p.detach().clone() for _, p in b]
        for model, opt in ((a, opt_a), (b, opt_b)):
            for (_, p), g in zip(model, _grads(model, step)):
                p.grad = g
            opt.step()
        sched.step()
        da = torch.cat([(p.detach() - q).flatten() for (_, p), q in zip(a, before[0])])
        db = torch.cat([(p.detach() - q).flatten() for (_, p), q in zip(b, before[1])])
        if step < 6:
            assert torch.equal(da, db), (info.name, step)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(5e-4)
    ratio = float(db.norm() / da.norm())
    assert ratio == pytest.approx(0.5, rel=0.05), (info.name, ratio)


@pytest.mark.parametrize("name", ["AdaptiveHinaAdamW", "Automagic_CameAMP", "Automagic_CameAMP8bit"])
def test_a_group_with_a_lower_lr_never_steps_above_its_lr_times_the_mask_ceiling(name):
    """A text-encoder-style group at a much lower lr: however long its gradients agree, its
    per-element lr stays within lr_mask_ceiling (x hypergrad_ceiling where the hypergradient scale
    is on) x its scheduled lr (it used to climb to max_lr)."""
    info = lookup(name)
    unet, te = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    off = ({"use_agr": False, "use_tam": False, "use_grams": False, "use_cautious": False, "use_spd": False,
            "use_adopt_stability": False, "use_dynamic_adaptation": False, "weight_decay": 0.0}
           if name == "AdaptiveHinaAdamW" else
           {"use_agr": False, "use_tam": False, "use_grams": False, "use_orthograd": False, "weight_decay": 0.0,
            "eta": None})
    opt = info.load()([{"params": [unet], "lr": 1e-3}, {"params": [te], "lr": 1e-28}], lr=1e-3, min_lr=1e-7,
                      max_lr=1e-2, warmup_steps=1000, **off)
    ceiling = opt.defaults["lr_mask_ceiling"] * opt.defaults.get("hypergrad_ceiling", 1.0)  # the documented bound
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s / 10))
    plain = torch.nn.Parameter(torch.zeros(8, 8))  # the same update without a mask, lr 1
    no_scale = {"use_hypergrad": False} if "hypergrad_ceiling" in opt.defaults else {}
    ref = info.load()([plain], lr=1.0, use_lr_mask=False, warmup_steps=1000, **off, **no_scale)
    for step in range(60):  # a constant gradient: every element agrees at every step
        lr_now = opt.param_groups[1]["lr"]
        before, ref_before = te.detach().clone(), plain.detach().clone()
        unet.grad, te.grad, plain.grad = torch.ones(8, 8), torch.ones(8, 8), torch.ones(8, 8)
        opt.step()
        ref.step()
        sched.step()
        moved, unit = (te.detach() - before).abs(), (plain.detach() - ref_before).abs()
        assert torch.all(moved <= ceiling * lr_now * unit * 1.001 + 1e-45), step
    assert float(opt.get_lr_mask_analysis()["global_statistics"]["max_lr_scale"]) > 1.5  # the mask did grow
