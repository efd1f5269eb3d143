"""AdaptiveHinaAdamW on a small model with named parameters (CPU, a few seconds).

A frozen two-layer network gets kohya-style LoRA adapters (``lora_down`` / ``lora_up``) and has
to learn a hidden low-rank change of its weights. The optimizer receives
``model.named_parameters()``, so it can tell which tensors form a LoRA pair.

Run from the repository root:

    python docs/examples/basic_usage.py
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.custom_hina_adaptive_adamw_optimizer import AdaptiveHinaAdamW  # noqa: E402


class LoRALinear(nn.Module):
    """out = base(x) + lora_up(lora_down(x)); the base layer is frozen, lora_up starts at zero."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(32, 64), rank=4), nn.Tanh(), LoRALinear(nn.Linear(64, 32), rank=4))
    # the change the adapters must learn: a hidden rank-2 delta per layer
    teacher = [torch.randn(64, 2) @ torch.randn(2, 32) * 0.1, torch.randn(32, 2) @ torch.randn(2, 64) * 0.1]

    def target(x):
        h = torch.tanh(model[0].base(x) + x @ teacher[0].t())
        return model[2].base(h) + h @ teacher[1].t()

    # (name, tensor) pairs: the names let the optimizer pair lora_down with lora_up
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = AdaptiveHinaAdamW(
        trainable,
        lr=2e-3,
        max_lr=1e-2,           # let the lr mask raise the rate up to 5x where directions agree
        warmup_steps=100,      # lr-mask warmup (full-size bumps) for the first 100 steps
        relationship_discovery_interval=50,
    )

    summary = optimizer.get_relationship_summary()
    print(f"parameters: {len(trainable)}, pairs found: {summary['total_relationships']} (method: {summary['method']})")
    for rel in summary["relationships"]:
        print(f"  {rel['param_name']} {rel['param_shape']} <-> {rel['partner_name']} {rel['partner_shape']}")

    gen = torch.Generator().manual_seed(1)
    first = last = None
    for step in range(1, 301):
        x = torch.randn(64, 32, generator=gen)
        with torch.no_grad():
            y = target(x)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
        first = last if first is None else first
        if step % 100 == 0:
            lr_stats = optimizer.get_lr_mask_analysis()["global_statistics"]
            imp = optimizer.get_importance_analysis()["importance_statistics"]
            print(f"step {step:3d}  loss {last:.5f}  lr-mask scale mean {lr_stats['avg_lr_scale']:.3f} "
                  f"[{lr_stats['min_lr_scale']:.3f}, {lr_stats['max_lr_scale']:.3f}]  "
                  f"importance [{imp['min']:.3f}, {imp['max']:.3f}]")

    print(f"loss: first step {first:.5f} -> last step {last:.5f}")
    if not last < first:
        raise SystemExit("the loss did not go down")
    print("basic_usage: OK")


if __name__ == "__main__":
    main()
