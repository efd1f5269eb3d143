"""The CPU chunk size of the multi-tensor step, measured in pairs.

    python -m benchmarks.probe_chunk [--sizes 262144 524288 1048576] [--rounds 8] [--optimizers ...]

``HinaOptimizer.chunk_elements["cpu"]`` bounds the elements one chunk of the step works on (its
scratch stays in cache between the passes; fewer, larger chunks mean fewer operator launches).
``bench_step``'s chunk table measures one size after another, so the VM's drift between them
lands in the comparison. Here every optimizer is built once per size (the size set on the
instance), all of them next to one ``torch.optim.AdamW(foreach=True)``, and timed in alternating
rounds at SD1.5 rank-16 LoRA shapes (528 tensors, 9.4M parameters): each cell is the minimum over
rounds of the minimum over ``--steps`` steps, and its ratio to the AdamW of the same process.
Writes ``benchmarks/results/probe_chunk.json``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_step import GENERAL
from benchmarks.common import machine, make_params, time_steps, write_json
from benchmarks.shapes import lora_shapes


def builders() -> dict:
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
    from library.optimizers.automagic import Automagic_CameAMP, Automagic_CameAMP8bit
    from library.optimizers.hina_adamw import HinaAdamWOptimizer

    return {
        "AdaptiveHinaAdamW(defaults)": lambda ps: AdaptiveHinaAdamW(ps),
        "AdaptiveHinaAdamW(general)": lambda ps: AdaptiveHinaAdamW(ps, **GENERAL),
        "AdaptiveHinaAdamW(general, 8bit)": lambda ps: AdaptiveHinaAdamW(ps, **GENERAL, optim_bits=8),
        "HinaAdamWOptimizer": lambda ps: HinaAdamWOptimizer(ps, lr=1e-3),
        "Automagic_CameAMP": lambda ps: Automagic_CameAMP(ps),
        "Automagic_CameAMP8bit": lambda ps: Automagic_CameAMP8bit(ps),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1 << 18, 1 << 19, 1 << 20])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--optimizers", nargs="+", default=None, help="names from the table (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    table = builders()
    names = args.optimizers or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"probe_chunk: unknown optimizer {unknown[0]!r}; known: {', '.join(table)}")

    named = make_params(lora_shapes(16))
    adamw = torch.optim.AdamW([p for _, p in named], lr=1e-3, foreach=True)
    opts = {}
    for name in names:
        for size in args.sizes:
            opt = table[name](named)
            opt.chunk_elements = {**type(opt).chunk_elements, "cpu": size}  # this instance only
            time_steps(opt, warmup=2, repeats=1)  # state allocated, arenas packed
            opts[(name, size)] = opt
    best = {key: float("inf") for key in opts}
    best_adamw = float("inf")
    for r in range(args.rounds):
        best_adamw = min(best_adamw, time_steps(adamw, warmup=1, repeats=args.steps))
        for key, opt in opts.items():
            best[key] = min(best[key], time_steps(opt, warmup=0, repeats=args.steps))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    out = {"machine": machine(), "tensors": len(named), "params": sum(p.numel() for _, p in named),
           "rounds": args.rounds, "steps": args.steps, "adamw_foreach_ms": best_adamw, "ms": {}, "ratio_vs_foreach": {}}
    print(f"AdamW(foreach): {best_adamw:.1f} ms")
    print("| optimizer | " + " | ".join(f"{s:,}" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in names:
        out["ms"][name] = {str(s): best[(name, s)] for s in args.sizes}
        out["ratio_vs_foreach"][name] = {str(s): best[(name, s)] / best_adamw for s in args.sizes}
        print(f"| {name} | " + " | ".join(f"{best[(name, s)]:.1f} ({best[(name, s)] / best_adamw:.2f}x)"
                                         for s in args.sizes) + " |")
    write_json("probe_chunk.json", out)
    return out


if __name__ == "__main__":
    main()
