"""`make demo` until the trainer lands: a LoRA-teacher run with AdaptiveHinaAdamW vs AdamW."""
from __future__ import annotations

import time

import torch

from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
from library.toy_tasks import train_lora_teacher


def main(steps: int = 400) -> None:
    runs = {
        "AdamW": lambda named: torch.optim.AdamW([p for _, p in named], lr=3e-3, weight_decay=0.0),
        "AdaptiveHinaAdamW": lambda named: AdaptiveHinaAdamW(named, lr=3e-3, max_lr=1e-2, warmup_steps=200),
    }
    print(f"LoRA-teacher task, {steps} steps (frozen base + hidden rank-4 delta; optimum = 0)")
    for name, make in runs.items():
        t0 = time.perf_counter()
        losses, held, _ = train_lora_teacher(make, steps=steps)
        dt = time.perf_counter() - t0
        print(f"  {name:20s} first loss {losses[0]:.4f}  final {losses[-1]:.5f}  held-out {held:.5f}  ({dt:.1f}s)")


if __name__ == "__main__":
    main()
