"""Small, fully local training tasks for demos, tests and benchmarks.

LoRA-teacher: a frozen random base plus a hidden low-rank delta that a kohya-style LoRA
(``lora_down`` / ``lora_up`` per layer, up zero-initialised) has to learn. The optimum is
known (loss 0 up to the target noise), so progress is measurable in a few hundred steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale


class LoRATeacher(nn.Module):
    """A stack of frozen Linear layers with LoRA adapters; ``target`` holds the hidden deltas."""

    def __init__(self, dims=(64, 96, 64), rank: int = 4, teacher_rank: int = 4, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers, self.deltas = [], []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            base = nn.Linear(din, dout)
            with torch.no_grad():
                base.weight.copy_(torch.randn(dout, din, generator=gen) / math.sqrt(din))
                base.bias.zero_()
            layers.append(LoRALinear(base, rank))
            b = torch.randn(dout, teacher_rank, generator=gen) / math.sqrt(teacher_rank)
            a = torch.randn(teacher_rank, din, generator=gen) / math.sqrt(din)
            self.deltas.append(0.5 * b @ a)
        self.layers = nn.ModuleList(layers)
        self.dims = dims
        self._gen = gen

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x

    @torch.no_grad()
    def teacher(self, x):
        for i, (layer, d) in enumerate(zip(self.layers, self.deltas)):
            x = layer.base(x) + x @ d.t()
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x

    def named_trainable(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def batch(self, n: int = 64):
        x = torch.randn(n, self.dims[0], generator=self._gen)
        return x, self.teacher(x)


def train_lora_teacher(make_optimizer, steps: int = 300, seed: int = 0, batch: int = 64, rank: int = 4,
                       dims=(64, 96, 64), eval_every: int = 0):
    """Train the LoRA-teacher task; returns ``(losses, held_out_loss, model)``."""
    torch.manual_seed(seed)
    model = LoRATeacher(dims=dims, rank=rank, seed=seed)
    opt = make_optimizer(model.named_trainable())
    losses = []
    for _ in range(steps):
        x, y = model.batch(batch)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        x = torch.randn(512, dims[0], generator=gen)
        held = float(torch.nn.functional.mse_loss(model(x), model.teacher(x)))
    return losses, held, model
