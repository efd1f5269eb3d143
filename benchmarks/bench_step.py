"""Step time and optimizer-state memory at real adapter shapes, side by side in one process.

    python -m benchmarks.bench_step [--quick] [--optimizers AdaptiveHinaAdamW ...] [--device cpu|cuda]

Measures, for each optimizer: median ms per ``step()`` at SD1.5 rank-16 LoRA shapes
(528 tensors, 9.4M params), its ratio to ``torch.optim.AdamW(foreach=True)`` and to fused
AdamW measured in the same process, each 8-bit form against its 32-bit twin (the two timed in
turns), optimizer-state bytes per parameter on the rank-16, rank-4 and small-LoKr sets, and the
per-tensor cost from 200 to 3,200 tensors.
``--device cuda`` times the same on the GPU (synchronised clock reads, results in
``step_cuda[_quick].json``); the CPU default writes ``step[_quick].json`` as before.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import make_params, state_bytes, time_steps, write_json
from benchmarks.shapes import lokr_shapes, lora_shapes

# the seed's general AdaptiveHinaAdamW config (seed 000)
GENERAL = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, use_dynamic_adaptation=True, adaptation_strength=1.0,
    relationship_discovery_interval=100, importance_decay=0.95, compatibility_threshold=0.3, use_lr_mask=True,
    lr_bump=3e-6, min_lr=1e-7, max_lr=1e-3, warmup_steps=500, use_spd=True, spd_lambda=0.06, use_cautious=True,
    use_adopt_stability=True, use_tam=True, dynamic_weight_decay=True, wd_transition_steps=800,
    wd_decay_factor=0.75, wd_min_ratio=0.1,
)


def builders():
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
    from library.optimizers.automagic import (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim,
                                              Automagic_CameAMP_COptim8bit)
    from library.optimizers.hina_adamw import HinaAdamWOptimizer

    table = {
        "AdamW(foreach)": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, foreach=True),
        "AdamW(fused)": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-3, fused=True),
        "AdaptiveHinaAdamW(defaults)": lambda ps: AdaptiveHinaAdamW(ps),
        "AdaptiveHinaAdamW(general)": lambda ps: AdaptiveHinaAdamW(ps, **GENERAL),
        "AdaptiveHinaAdamW(general, no hypergrad)": lambda ps: AdaptiveHinaAdamW(ps, **GENERAL, use_hypergrad=False),
        # the composition docs/optimizers.md offers for speed: the general config without SPD, AGR and importance
        "AdaptiveHinaAdamW(general, no SPD/AGR/importance)": lambda ps: AdaptiveHinaAdamW(
            ps, **{**GENERAL, "use_spd": False, "use_dynamic_adaptation": False}, use_agr=False),
        "AdaptiveHinaAdamW(all off)": lambda ps: AdaptiveHinaAdamW(
            ps, lr=1e-3, use_spd=False, use_cautious=False, use_adopt_stability=False, use_grams=False,
            use_agr=False, use_tam=False, use_dynamic_adaptation=False, use_lr_mask=False, use_hypergrad=False,
            dynamic_weight_decay=False),
        "AdaptiveHinaAdamW(defaults, 8bit)": lambda ps: AdaptiveHinaAdamW(ps, optim_bits=8),
        "AdaptiveHinaAdamW(general, 8bit)": lambda ps: AdaptiveHinaAdamW(ps, **GENERAL, optim_bits=8),
        "AdaptiveHinaAdamW(all off, 8bit)": lambda ps: AdaptiveHinaAdamW(
            ps, lr=1e-3, use_spd=False, use_cautious=False, use_adopt_stability=False, use_grams=False,
            use_agr=False, use_tam=False, use_dynamic_adaptation=False, use_lr_mask=False, use_hypergrad=False,
            dynamic_weight_decay=False, optim_bits=8),
        "HinaAdamWOptimizer": lambda ps: HinaAdamWOptimizer(ps, lr=1e-3),
        "HinaAdamWOptimizer(8bit)": lambda ps: HinaAdamWOptimizer(ps, lr=1e-3, optim_bits=8),
        "HinaAdamWOptimizer(no SPD/AGR)": lambda ps: HinaAdamWOptimizer(ps, lr=1e-3, use_spd=False, use_agr=False),
        "Automagic_CameAMP": lambda ps: Automagic_CameAMP(ps),
        "Automagic_CameAMP8bit": lambda ps: Automagic_CameAMP8bit(ps),
        "Automagic_CameAMP_COptim": lambda ps: Automagic_CameAMP_COptim(ps),
        "Automagic_CameAMP_COptim8bit": lambda ps: Automagic_CameAMP_COptim8bit(ps),
    }
    try:
        import bitsandbytes as bnb

        table["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit([p for _, p in ps], lr=1e-3)
    except Exception:  # pragma: no cover - optional contender
        pass
    return table


# each 8-bit form and its 32-bit twin, timed against each other in alternating rounds
TWINS = [("AdaptiveHinaAdamW(defaults)", "AdaptiveHinaAdamW(defaults, 8bit)"),
         ("AdaptiveHinaAdamW(general)", "AdaptiveHinaAdamW(general, 8bit)"),
         ("AdaptiveHinaAdamW(all off)", "AdaptiveHinaAdamW(all off, 8bit)"),
         ("HinaAdamWOptimizer", "HinaAdamWOptimizer(8bit)"),
         ("Automagic_CameAMP", "Automagic_CameAMP8bit"),
         ("Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit")]


def twin_ratios(table, params, rounds: int, steps: int) -> dict:
    """{8-bit name: {"ms_32", "ms_8", "ratio"}}: the two twins built side by side and timed in
    turns (a ratio of two numbers measured minutes apart moves with the VM's speed)."""
    out = {}
    for name32, name8 in TWINS:
        if name32 not in table or name8 not in table:
            continue
        pair = {name32: table[name32](params), name8: table[name8](params)}
        best = {k: float("inf") for k in pair}
        for _ in range(rounds):
            for k, opt in pair.items():
                best[k] = min(best[k], time_steps(opt, warmup=1, repeats=steps))
        out[name8] = {"twin": name32, "ms_32": best[name32], "ms_8": best[name8], "ratio": best[name8] / best[name32]}
        del pair
    return out


def per_tensor_cost(build, counts, device, rounds: int, steps: int) -> dict:
    """Microseconds per tensor of one optimizer on ``n`` tiled rank-4 SD1.5 LoRA tensors for each
    ``n`` of ``counts``: every size built at once and timed in alternating rounds (the VM's speed
    drifts), the minimum over rounds of the minimum over ``steps`` steps."""
    opts = {n: build(make_params(lora_shapes(4, repeat=-(-n // 528))[:n], device=device)) for n in counts}
    best = {n: float("inf") for n in counts}
    for _ in range(rounds):
        for n, opt in opts.items():
            best[n] = min(best[n], time_steps(opt, warmup=1, repeats=steps) / n * 1e3)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--optimizers", nargs="*")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    repeats = 5 if args.quick else 11
    table = builders()
    if args.optimizers:
        table = {k: v for k, v in table.items() if k in args.optimizers or k.startswith(("AdamW(",))}
    results = {"device": str(device), "step_ms": {}, "bytes_per_param": {}, "scaling": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)

    params = make_params(lora_shapes(16), device=device)
    n_params = sum(p.numel() for _, p in params)
    # One optimizer at a time, timed in rounds that alternate with the two AdamW references built
    # next to it (so all three have warm state; a VM that pages out cold memory punishes optimizers
    # whose state sat idle while others ran). ms/step = the minimum over rounds of the minimum over
    # a few steps; ratios = ratios of those minimums against the references of the same pairing.
    rounds = 3 if args.quick else 5
    steps = max(2, repeats // 3)
    per_round, ratios_f, ratios_fused = {}, {}, {}
    for name, build in table.items():
        ref = torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
        ref_fused = torch.optim.AdamW([p for _, p in params], lr=1e-3, fused=True)
        opt = build(params)
        t_opt, t_ref, t_fused = [], [], []
        for _ in range(rounds):
            t_ref.append(time_steps(ref, warmup=1, repeats=steps))
            t_fused.append(time_steps(ref_fused, warmup=1, repeats=steps))
            t_opt.append(time_steps(opt, warmup=1, repeats=steps))
        per_round[name] = t_opt
        ratios_f[name] = min(t_opt) / min(t_ref)
        ratios_fused[name] = min(t_opt) / min(t_fused)
        del ref, ref_fused, opt
    results["step_ms"] = {k: min(v) for k, v in per_round.items()}
    results["step_ms_rounds"] = per_round
    results["timing"] = (f"each optimizer built alone next to the two AdamW references, {rounds} alternating "
                         f"rounds; ms/step = min over rounds of the min over {steps} steps; ratios of those "
                         "minimums against the references of the same pairing")
    results["ratio_vs_foreach"] = ratios_f
    results["ratio_vs_fused"] = ratios_fused
    results["eight_bit_over_32_bit"] = twin_ratios(table, params, rounds, steps)

    sets = {"lora_r16": lora_shapes(16), "lora_r4": lora_shapes(4), "lokr_f-1_d16": lokr_shapes(16)}
    for set_name, shapes in sets.items():
        ps = make_params(shapes, device=device)
        n = sum(p.numel() for _, p in ps)
        for name, build in table.items():
            opt = build(ps)
            opt.step()
            results["bytes_per_param"].setdefault(name, {})[set_name] = state_bytes(opt) / n

    counts = [200, 800, 3200] if args.quick else [200, 400, 800, 1600, 3200]
    for name, build in table.items():
        if name.startswith("AdamW(fused") or name.startswith("bnb"):
            continue
        results["scaling"][name] = per_tensor_cost(build, counts, device, rounds, steps)

    # the chunk size of the multi-tensor step on this device (elements per chunk): general config, same process
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW

    default_chunk = dict(AdaptiveHinaAdamW.chunk_elements)
    default_size = default_chunk.get(device.type, AdaptiveHinaAdamW.default_chunk_elements)
    sizes = [1 << 16, 1 << 18, 1 << 20, 1 << 30] if args.quick else [1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 22, 1 << 30]
    sizes = sorted({*sizes, default_size})  # the device's default chunk is always measured
    sweep = {}
    adamw = torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
    try:
        for size in sizes:
            AdaptiveHinaAdamW.chunk_elements = {**default_chunk, device.type: size}
            ms = time_steps(AdaptiveHinaAdamW(params, **GENERAL), repeats=repeats)
            sweep[str(size)] = {"ms": ms, "ratio_vs_foreach": ms / time_steps(adamw, repeats=repeats)}
    finally:
        AdaptiveHinaAdamW.chunk_elements = default_chunk
    results["chunk_sweep"] = {"default": default_size, "general_ms": sweep}

    on = f", on {results['gpu']}" if "gpu" in results else ""
    print(f"SD1.5 rank-16 LoRA shapes: {len(params)} tensors, {n_params / 1e6:.2f}M params{on}")
    print("| optimizer | ms/step | x AdamW(foreach) | x AdamW(fused) | B/param r16 | r4 | LoKr |")
    print("|---|---|---|---|---|---|---|")
    for name, ms in results["step_ms"].items():
        b = results["bytes_per_param"][name]
        print(f"| {name} | {ms:.1f} | {results['ratio_vs_foreach'][name]:.2f} | {results['ratio_vs_fused'][name]:.2f} "
              f"| {b['lora_r16']:.3f} | {b['lora_r4']:.3f} | {b['lokr_f-1_d16']:.3f} |")
    for name8, row in results["eight_bit_over_32_bit"].items():
        print(f"{name8} / {row['twin']}: {row['ms_8']:.1f} / {row['ms_32']:.1f} ms = {row['ratio']:.2f}")
    print(f"AdaptiveHinaAdamW(general) by {device.type.upper()} chunk size (elements): " + ", ".join(
        f"{k}: {v['ms']:.1f} ms ({v['ratio_vs_foreach']:.2f}x)" for k, v in sweep.items()))
    print("per-tensor cost (us/tensor) by tensor count:")
    for name, row in results["scaling"].items():
        print(f"  {name}: " + ", ".join(f"{k}: {v:.1f}" for k, v in row.items()))
    stem = "step" if device.type == "cpu" else f"step_{device.type}"
    write_json(f"{stem}_quick.json" if args.quick else f"{stem}.json", results)
    return results


if __name__ == "__main__":
    main()
