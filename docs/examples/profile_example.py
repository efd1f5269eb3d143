"""Illustrative per-feature timing of one AdaptiveHinaAdamW step (time.perf_counter, CPU).

ILLUSTRATIVE ONLY. This is not a benchmark: it runs a handful of steps on tiny LoRA-shaped
tensors, on whatever machine you have, with whatever else is running. The numbers it prints
vary between runs and machines and say nothing about training quality. The measured
benchmarks live in ``benchmarks/`` and their results in ``docs/benchmarks.md``.

It times ``optimizer.step()`` alone (gradients are fixed random tensors), first with every
extra feature off (plain AdamW math), then with one feature switched on at a time, then with
the defaults, and prints the median over the timed steps.

Run from the repository root:

    python docs/examples/profile_example.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from library.optimizers.adaptive_hina import AdaptiveHinaAdamW  # noqa: E402

ALL_OFF = dict(
    use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False, use_grams=False,
    use_agr=False, use_tam=False, use_dynamic_adaptation=False, use_lr_mask=False, dynamic_weight_decay=False,
)
FEATURES = [
    ("AGR", dict(use_agr=True)),
    ("OrthoGrad", dict(use_orthogonal_grad=True)),
    ("ADOPT", dict(use_adopt_stability=True)),
    ("TAM", dict(use_tam=True)),
    ("Grams", dict(use_grams=True)),
    ("Cautious", dict(use_cautious=True)),
    ("Grams+Cautious", dict(use_grams=True, use_cautious=True)),
    ("lr mask", dict(use_lr_mask=True)),
    ("SPD", dict(use_spd=True)),
    ("dynamic weight decay", dict(dynamic_weight_decay=True)),
    ("importance (interval 1)", dict(use_dynamic_adaptation=True, relationship_discovery_interval=1)),
    ("ALLoRA rows", dict(allora_eta=1.0)),
    ("optim_bits=8", dict(optim_bits=8)),
]


def lora_params(pairs: int = 16, width: int = 320, rank: int = 8):
    gen = torch.Generator().manual_seed(0)
    named = []
    for i in range(pairs):
        named.append((f"m{i}.lora_down.weight", torch.nn.Parameter(torch.randn(rank, width, generator=gen) * 0.05)))
        named.append((f"m{i}.lora_up.weight", torch.nn.Parameter(torch.randn(width, rank, generator=gen) * 0.01)))
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for _, p in named]
    return named, grads


def time_steps(options: dict, warmup: int = 3, timed: int = 8) -> float:
    named, grads = lora_params()
    opt = AdaptiveHinaAdamW(named, lr=1e-4, **options)
    samples = []
    for i in range(warmup + timed):
        for (_, p), g in zip(named, grads):
            p.grad = g
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            samples.append(dt)
    return statistics.median(samples) * 1e3


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: more CPU threads only add overhead
    named, _ = lora_params()
    n = sum(p.numel() for _, p in named)
    print("ILLUSTRATIVE timing on this machine (not a benchmark; see docs/benchmarks.md)")
    print(f"{len(named)} LoRA tensors, {n} elements; median of 8 timed step() calls after 3 warm-up calls\n")
    base = time_steps(ALL_OFF)
    print(f"{'configuration':<28}{'ms/step':>9}{'vs all off':>12}")
    print(f"{'all extra features off':<28}{base:>9.2f}{1.0:>11.2f}x")
    for label, extra in FEATURES:
        ms = time_steps({**ALL_OFF, **extra})
        print(f"{'+ ' + label:<28}{ms:>9.2f}{ms / base:>11.2f}x")
    ms = time_steps({})
    print(f"{'defaults (all default-on)':<28}{ms:>9.2f}{ms / base:>11.2f}x")

    params = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    ref = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    _, grads = lora_params()
    samples = []
    for i in range(11):
        for p, g in zip(params, grads):
            p.grad = g
        t0 = time.perf_counter()
        ref.step()
        if i >= 3:
            samples.append(time.perf_counter() - t0)
    print(f"{'torch.optim.AdamW (foreach)':<28}{statistics.median(samples) * 1e3:>9.2f}"
          f"{statistics.median(samples) * 1e3 / base:>11.2f}x")
    print("\nprofile_example: OK (illustrative numbers only)")


if __name__ == "__main__":
    main()
