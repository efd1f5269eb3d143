"""Every AdaptiveHinaAdamW feature on a small LoRA model: diagnostics, scheduler, save / resume.

What it shows (CPU, a few seconds):
1. three ways to give parameter names (named tuples, a group key ``named``, set_param_names);
2. every technique switched on, two param groups, a non-adapter parameter (own SPD anchor);
3. a cosine lr schedule: the per-element lr mask multiplies the *current* group lr;
4. every diagnostics method and its keys;
5. state_dict save -> load into a fresh model and optimizer -> both continue bit-identically.

Run from the repository root:

    python docs/examples/full_usage.py
"""
from __future__ import annotations

import io
import json
import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.optimizers.adaptive_hina import AdaptiveHinaAdamW  # noqa: E402


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class Model(nn.Module):
    """Two adapted layers ("text encoder" and "unet" stand-ins) and a trainable LayerNorm."""

    def __init__(self):
        super().__init__()
        self.te = LoRALinear(nn.Linear(24, 48), rank=4)
        self.norm = nn.LayerNorm(48)  # not an adapter: SPD anchors it at its initial value
        self.unet = LoRALinear(nn.Linear(48, 24), rank=4)

    def forward(self, x):
        return self.unet(torch.tanh(self.norm(self.te(x))))


def make_model() -> Model:
    torch.manual_seed(0)
    return Model()


def param_groups(model: Model) -> list[dict]:
    """kohya-style groups: one per component, each with the group key ``named`` (names aligned with params)."""
    groups = []
    for prefix, lr in (("te", 2e-3), ("unet", 4e-3)):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)]
        groups.append({"params": [p for _, p in named], "named": [n for n, _ in named], "lr": lr})
    groups[1]["params"] += [model.norm.weight, model.norm.bias]
    groups[1]["named"] += ["norm.weight", "norm.bias"]
    return groups


OPTIONS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    use_spd=True, spd_lambda=0.06, spd_anchor="auto",
    use_cautious=True, use_grams=True,          # both on: the averaged rule (see docs/optimizers.md)
    use_orthogonal_grad=True, use_adopt_stability=True, use_agr=True,
    use_tam=True, tam_beta=0.999,
    use_dynamic_adaptation=True, adaptation_strength=1.0, relationship_discovery_interval=20,
    importance_decay=0.95, compatibility_threshold=0.3,
    use_lr_mask=True, lr_bump=1e-4, min_lr=1e-6, max_lr=1e-2, warmup_steps=60, lr_mask_post_warmup_ratio=0.1,
    dynamic_weight_decay=True, wd_transition_steps=40, wd_decay_factor=0.7, wd_min_ratio=0.1,
    lora_plus_ratio=4.0,                         # LoRA+-style ratio on every lora_up (once; see docs)
    allora_eta=1.0,                              # ALLoRA-style per-row scaling of paired factors
)


def build(model: Model):
    opt = AdaptiveHinaAdamW(param_groups(model), **OPTIONS)
    total = 120
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def batches(model: Model, seed: int):
    """Inputs and targets of a teacher: the frozen base layers plus a hidden rank-2 change each."""
    gen = torch.Generator().manual_seed(seed)
    d_te = torch.randn(48, 2, generator=gen) @ torch.randn(2, 24, generator=gen) * 0.15
    d_unet = torch.randn(24, 2, generator=gen) @ torch.randn(2, 48, generator=gen) * 0.15
    te_base, unet_base = model.te.base, model.unet.base  # frozen: identical in every copy
    while True:
        x = torch.randn(32, 24, generator=gen)
        with torch.no_grad():
            h = torch.tanh(nn.functional.layer_norm(te_base(x) + x @ d_te.t(), (48,)))
            y = unet_base(h) + h @ d_unet.t()
        yield x, y


def train(model, opt, sched, data, steps: int) -> float:
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = next(data)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def show(title: str, value) -> None:
    print(f"--- {title}")
    print(json.dumps(value, indent=1, default=str)[:1200])


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead
    # 1. names: (name, tensor) pairs, the group key "named" (used below), or set_param_names afterwards
    plain = make_model()
    opt_plain = AdaptiveHinaAdamW([p for p in plain.parameters() if p.requires_grad])
    print("without names, pairing method:", opt_plain.get_relationship_summary()["method"])
    count = opt_plain.set_param_names(plain.named_parameters())
    print(f"set_param_names named {count} tensors, pairing method now:",
          opt_plain.get_relationship_summary()["method"])

    # 2-3. every feature, two groups, cosine schedule
    model = make_model()
    opt, sched = build(model)
    data = batches(model, 1)
    first = train(model, opt, sched, data, 1)
    loss = train(model, opt, sched, data, 79)
    lrs = ", ".join(f"{g['lr']:.2e} (base {g['base_lr']:.0e})" for g in opt.param_groups)
    print(f"loss after 1 step {first:.4f}, after 80 steps {loss:.4f}; scheduled group lrs now: {lrs}")
    if not loss < first:
        raise SystemExit("the loss did not go down")
    mask = opt.state[model.unet.lora_up.weight]["lr_mask"].float()
    lr_now = opt.param_groups[1]["lr"]
    print(f"unet lora_up: mask scale in [{mask.min():.3f}, {mask.max():.3f}] -> per-element lr in "
          f"[{lr_now * mask.min():.2e}, {lr_now * mask.max():.2e}] at the current scheduled lr {lr_now:.2e}")
    print("SPD anchor stored for:", [opt.param_name(p) for p, st in opt.state.items() if "anchor" in st],
          "(adapters use anchor zero and store nothing)")

    # 4. diagnostics (computed on request; step() itself never syncs with the host)
    show("get_optimization_info()", opt.get_optimization_info())
    show("get_relationship_summary()", opt.get_relationship_summary())
    show("get_importance_analysis()", opt.get_importance_analysis())
    show("get_lr_mask_analysis()", opt.get_lr_mask_analysis())
    show("get_buffer_pool_stats()", opt.get_buffer_pool_stats())
    show("diagnostics_scalars()", opt.diagnostics_scalars())
    print(f"state bytes per trainable element: {opt.state_bytes() / sum(p.numel() for g in opt.param_groups for p in g['params']):.2f}")
    opt.clear_buffer_pool()
    print("after clear_buffer_pool():", opt.get_buffer_pool_stats()["total_buffers"], "buffers")

    # 5. save, load into fresh objects, continue both: identical bits
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "data": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_model()
    model2.load_state_dict(ckpt["model"])
    opt2, sched2 = build(model2)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    data_a, data_b = batches(model, 7), batches(model2, 7)
    la = train(model, opt, sched, data_a, 40)
    lb = train(model2, opt2, sched2, data_b, 40)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    print(f"resumed run: loss {lb:.6f} vs uninterrupted {la:.6f}; parameters bit-identical: {same}")
    if not same:
        raise SystemExit("resume was not bit-exact")
    print("full_usage: OK")


if __name__ == "__main__":
    main()
