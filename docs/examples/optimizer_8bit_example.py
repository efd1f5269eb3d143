"""optim_bits=8: what is stored in 8 bits, how many bytes the state takes, and exact resume.

AdaptiveHinaAdamW and HinaAdamWOptimizer with ``optim_bits=8`` keep the first moment (signed
blockwise 8-bit), the square root of the second moment (unsigned blockwise 8-bit) and, for
AdaptiveHinaAdamW, the lr mask (8-bit log-domain codes) in 8-bit form. Requantisation uses
stochastic rounding seeded by (parameter index, step), so a resumed run replays bit-exactly.
No bitsandbytes is needed. The same names work from train_network.py:
``--optimizer_type HinaAdaptiveAdamW8bit`` / ``HinaAdamWOptimizer8bit``.

Run from the repository root (CPU, a few seconds):

    python docs/examples/optimizer_8bit_example.py
"""
from __future__ import annotations

import io
import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.optimizers.adaptive_hina import AdaptiveHinaAdamW  # noqa: E402
from library.optimizers.hina_adamw import HinaAdamWOptimizer  # noqa: E402


def lora_model(seed: int = 0) -> nn.ModuleDict:
    """Four LoRA pairs at rank 16 on 256-wide layers (the adapters only; no base model needed here)."""
    torch.manual_seed(seed)
    mods = nn.ModuleDict()
    for i in range(4):
        down = nn.Linear(256, 16, bias=False)
        up = nn.Linear(16, 256, bias=False)
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
    w = torch.randn(256, 4, generator=gen) @ torch.randn(4, 256, generator=gen) * 0.02
    while True:
        x = torch.randn(32, 256, generator=gen)
        yield x, x + x @ w.t()


def train(mods, opt, batches, steps: int) -> float:
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = next(batches)
        loss = nn.functional.mse_loss(forward(mods, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead
    n_elem = sum(p.numel() for p in lora_model().parameters())
    print(f"trainable elements: {n_elem}")
    print(f"{'optimizer':<22}{'bits':>5}{'state bytes':>13}{'bytes/element':>15}{'loss after 30 steps':>22}")
    results = {}
    for cls in (AdaptiveHinaAdamW, HinaAdamWOptimizer):
        for bits in (32, 8):
            mods = lora_model()
            opt = cls(mods.named_parameters(), lr=1e-3, optim_bits=bits)
            loss = train(mods, opt, data(1), 30)
            nbytes = opt.state_bytes()
            results[(cls.__name__, bits)] = nbytes
            print(f"{cls.__name__:<22}{bits:>5}{nbytes:>13}{nbytes / n_elem:>15.3f}{loss:>22.6f}")

    # what one parameter's 8-bit state holds
    mods = lora_model()
    opt = AdaptiveHinaAdamW(mods.named_parameters(), lr=1e-3, optim_bits=8)
    train(mods, opt, data(1), 3)
    st = opt.state[mods["block0"]["lora_down"].weight]
    print("state of block0.lora_down.weight (AdaptiveHinaAdamW, optim_bits=8):")
    for k, v in st.items():
        desc = f"{tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else repr(v)
        print(f"  {k:<24}{desc}")

    # bit-exact resume of the 8-bit state
    buf = io.BytesIO()
    torch.save({"model": mods.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    mods2 = lora_model(seed=123)  # different init, overwritten by the checkpoint
    mods2.load_state_dict(ckpt["model"])
    opt2 = AdaptiveHinaAdamW(mods2.named_parameters(), lr=1e-3, optim_bits=8)
    opt2.load_state_dict(ckpt["opt"])
    train(mods, opt, data(5), 10)
    train(mods2, opt2, data(5), 10)
    same = all(torch.equal(a, b) for a, b in zip(mods.parameters(), mods2.parameters()))
    print(f"8-bit resume bit-identical after 10 more steps: {same}")
    if not same:
        raise SystemExit("8-bit resume was not bit-exact")
    if not results[("AdaptiveHinaAdamW", 8)] < results[("AdaptiveHinaAdamW", 32)] / 3:
        raise SystemExit("8-bit state is not smaller")
    print("optimizer_8bit_example: OK")


if __name__ == "__main__":
    main()
