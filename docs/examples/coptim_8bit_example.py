"""Automagic_CameAMP_COptim8bit: the context-aware lr multiplier with 8-bit state (CPU, a few seconds).

What it shows:
1. training a small LoRA the way ``train_network.py`` does: ``optimizer.step()`` with no
   closure, then ``optimizer.report_loss(loss.detach())``; the context multiplier moves
   every step, inside ``lr_multiplier_bounds``;
2. a reported loss spike cuts the multiplier at the next step;
3. what one tensor's state holds (which parts are 8-bit) and the state bytes per element of
   the four Automagic_CameAMP classes on the same model;
4. save -> load into a fresh model and optimizer -> both continue bit-identically (the
   8-bit stochastic rounding is seeded by (seed, step, parameter index)).

This replaces the original ``example_coptim_8bit_usage.py`` (its optimizer crashed at step 1).
From the command line: ``--optimizer_type Automagic_CameAMP_COptim8bit`` (the trainer calls
``report_loss`` for you). See docs/automagic.md.

Run from the repository root:

    python docs/examples/coptim_8bit_example.py
"""
from __future__ import annotations

import io
import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.automagic_cameamp import (  # noqa: E402
    Automagic_CameAMP,
    Automagic_CameAMP8bit,
    Automagic_CameAMP_COptim,
    Automagic_CameAMP_COptim8bit,
)

LR = 1e-3  # the family's default lr; the lr mask moves each element's lr within [0.1, 10] x LR
KW = dict(lr=LR, warmup_steps=40)


def lora_model(seed: int = 0) -> nn.ModuleDict:
    """Three LoRA pairs at rank 8 on 128-wide layers, plus one bias vector (adapters only)."""
    torch.manual_seed(seed)
    mods = nn.ModuleDict()
    for i in range(3):
        down = nn.Linear(128, 8, bias=False)
        up = nn.Linear(8, 128, bias=i == 2)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        mods[f"block{i}"] = nn.ModuleDict({"lora_down": down, "lora_up": up})
    return mods


def forward(mods: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    for m in mods.values():
        x = x + m["lora_up"](m["lora_down"](x))
    return x


def data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(128, 4, generator=gen) @ torch.randn(4, 128, generator=gen) * 0.05
    while True:
        x = torch.randn(32, 128, generator=gen)
        yield x, x + x @ w.t()


def train(mods, opt, batches, steps: int, log=None) -> float:
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = next(batches)
        loss = nn.functional.mse_loss(forward(mods, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # no closure, as kohya calls it
        if hasattr(opt, "report_loss"):
            opt.report_loss(loss.detach())  # what train_network.py does after each step
        if log is not None:
            log.append(opt.get_context_info()[0]["lr_multiplier"])
    return float(loss.detach())


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead

    # 1. training with reported losses; the multiplier moves within its bounds
    mods = lora_model()
    opt = Automagic_CameAMP_COptim8bit(mods.named_parameters(), **KW, lr_multiplier_bounds=(0.5, 2.0))
    batches = data(1)
    x0, y0 = next(data(1))
    with torch.no_grad():
        first = float(nn.functional.mse_loss(forward(mods, x0), y0))
    mults: list[float] = []
    last = train(mods, opt, batches, 60, log=mults)
    print(f"loss: first {first:.5f}, after 60 steps {last:.5f}")
    print("lr multiplier, steps 1..60 (every 10th):", [round(m, 4) for m in mults[::10]])
    print(f"lr multiplier range: [{min(mults):.4f}, {max(mults):.4f}] within bounds (0.5, 2.0)")
    info = opt.get_context_info()[0]
    print("context:", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in info.items()})

    # 2. a loss spike, reported after a step, halves the multiplier used by the next step (never
    #    below the lower bound, 0.5 here)
    before = opt.get_context_info()[0]["lr_multiplier"]
    train(mods, opt, batches, 1)
    opt.report_loss(torch.tensor(100.0))  # as if one batch had exploded
    train(mods, opt, batches, 1)
    after = opt.get_context_info()[0]["lr_multiplier"]
    print(f"multiplier before the spike {before:.4f}, at the step after it {after:.4f}")

    # 3. what is 8-bit, and bytes per element of the four classes
    st = opt.state[mods["block2"]["lora_up"].weight]
    print("state of block2.lora_up.weight (a matrix):")
    for k, v in st.items():
        print(f"  {k:<22}{tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else f"  {k:<22}{v!r}")
    st = opt.state[mods["block2"]["lora_up"].bias]
    print("state of block2.lora_up.bias (a vector):", ", ".join(sorted(st)))
    n_elem = sum(p.numel() for p in mods.parameters())
    sizes = {}
    print(f"{'class':<30}{'state bytes/element':>20}")
    for cls in (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit):
        m = lora_model()
        o = cls(m.named_parameters(), **KW)
        train(m, o, data(1), 2)
        sizes[cls.__name__] = o.state_bytes() / n_elem
        print(f"{cls.__name__:<30}{sizes[cls.__name__]:>20.3f}")

    # 4. checkpoint and bit-exact continuation
    buf = io.BytesIO()
    torch.save({"model": mods.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    mods2 = lora_model(seed=123)  # different init, overwritten by the checkpoint
    mods2.load_state_dict(ckpt["model"])
    opt2 = Automagic_CameAMP_COptim8bit(mods2.named_parameters(), **KW, lr_multiplier_bounds=(0.5, 2.0))
    opt2.load_state_dict(ckpt["opt"])
    train(mods, opt, data(7), 10)
    train(mods2, opt2, data(7), 10)
    same = all(torch.equal(a, b) for a, b in zip(mods.parameters(), mods2.parameters()))
    print(f"resume bit-identical after 10 more steps: {same}")

    if not same:
        raise SystemExit("resume was not bit-exact")
    if not (last < first and all(0.5 - 1e-6 <= m <= 2.0 + 1e-6 for m in mults) and len(set(mults)) > 5):
        raise SystemExit("the multiplier did not move within its bounds, or the loss did not fall")
    if not (after < before and after <= max(0.5, 0.75 * before)):
        raise SystemExit("the loss spike did not cut the multiplier")
    if not sizes["Automagic_CameAMP_COptim8bit"] < 0.5 * sizes["Automagic_CameAMP_COptim"]:
        raise SystemExit("8-bit state is not smaller")
    print("coptim_8bit_example: OK")


if __name__ == "__main__":
    main()
