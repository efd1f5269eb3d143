"""Automagic_CameAMP family: step time and state memory at SD1.5 adapter shapes.

    python -m benchmarks.bench_automagic [--quick]

Measured in one process, next to ``torch.optim.AdamW(foreach=True)``:
- median ms per ``step()`` at SD1.5 rank-16 LoRA shapes (528 tensors, 9.4M params) for
  the four Automagic_CameAMP classes and RefactoredAutomagicCameAMP with every regulariser
  off and on (in the early-warmup phase, and in the stable phase where the Cautious mask is
  on). Optimizers are timed round-robin over several rounds and the fastest step is kept
  (``benchmarks/common.py::time_steps``), which filters out load from other processes on a
  shared machine;
- the refactored optimizer's mean ms over a whole ``rank_interval`` (so the periodic
  eigendecompositions are amortised into the number);
- the cost of the non-finite guard (``skip_nonfinite``, on by default) against the same class
  with it off;
- optimizer-state bytes per parameter (``benchmarks/common.py::state_bytes``);
- the same for a LoCon-style set with 3x3 conv factors, the only shapes on which the
  image-space regularisers (edge, FFT, spatial, background) do anything.
Writes ``benchmarks/results/automagic.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import make_params, state_bytes, time_steps, write_json
from benchmarks.shapes import lora_shapes

REG_OFF = dict(edge_suppression=False, background_regularization=False, lora_rank_penalty=False,
               spatial_awareness=False, low_rank_emphasis=1.0)


def locon_shapes(rank: int = 16):
    """LoCon on SD1.5's 3x3 ResNet convs (down (r, c, 3, 3), up (c, r, 1, 1)): 22 convs."""
    chans = [320] * 4 + [640] * 4 + [1280] * 6 + [640] * 4 + [320] * 4
    out = []
    for i, c in enumerate(chans):
        out.append((f"lora_unet_resnet{i}_conv.lora_down.weight", (rank, c, 3, 3)))
        out.append((f"lora_unet_resnet{i}_conv.lora_up.weight", (c, rank, 1, 1)))
    return out


def builders():
    from library.optimizers.automagic import (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim,
                                              Automagic_CameAMP_COptim8bit)
    from library.optimizers.automagic_refactored import RefactoredAutomagicCameAMP

    kw = dict(lr=1e-4, warmup_steps=500)
    return {
        "AdamW(foreach)": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-4, foreach=True),
        "Automagic_CameAMP": lambda ps: Automagic_CameAMP(ps, **kw),
        "Automagic_CameAMP (skip_nonfinite off)": lambda ps: Automagic_CameAMP(ps, **kw, skip_nonfinite=False),
        "Automagic_CameAMP8bit": lambda ps: Automagic_CameAMP8bit(ps, **kw),
        "Automagic_CameAMP8bit (skip_nonfinite off)": lambda ps: Automagic_CameAMP8bit(ps, **kw, skip_nonfinite=False),
        "Automagic_CameAMP_COptim": lambda ps: Automagic_CameAMP_COptim(ps, **kw),
        "Automagic_CameAMP_COptim8bit": lambda ps: Automagic_CameAMP_COptim8bit(ps, **kw),
        "Refactored (regularisers off)": lambda ps: RefactoredAutomagicCameAMP(ps, **kw, **REG_OFF),
        "Refactored (all on, warmup)": lambda ps: RefactoredAutomagicCameAMP(ps, **kw),
        "Refactored (all on, stable phase)": lambda ps: RefactoredAutomagicCameAMP(ps, lr=1e-4, warmup_steps=2),
    }


def timed_round_robin(opts: dict, rounds: int, repeats: int) -> dict:
    best = {k: float("inf") for k in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            best[name] = min(best[name], time_steps(opt, warmup=1, repeats=repeats))
    return best


def amortised_ms(opt, steps: int) -> float:
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.mean(ts)


def measure(shapes, table, rounds, repeats):
    params = {}
    opts = {}
    for name, build in table.items():
        ps = make_params(shapes)  # each optimizer gets its own copy of the parameters
        opt = build(ps)
        opt.step()
        opt.step()
        params[name] = ps
        opts[name] = opt
    n = sum(p.numel() for _, p in next(iter(params.values())))
    ms = timed_round_robin(opts, rounds, repeats)
    bpp = {name: state_bytes(opt) / n for name, opt in opts.items()}
    return opts, ms, bpp, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rounds, repeats = (2, 3) if args.quick else (4, 5)
    table = builders()
    results: dict = {}

    shapes = lora_shapes(16)
    opts, ms, bpp, n = measure(shapes, table, rounds, repeats)
    base = ms["AdamW(foreach)"]
    ref_on = opts["Refactored (all on, warmup)"]
    interval = ref_on.config.rank_interval
    amort_on = amortised_ms(ref_on, interval)
    amort_off = amortised_ms(opts["Refactored (regularisers off)"], interval)
    results["lora_r16"] = {
        "tensors": len(shapes), "params": n, "step_ms": ms, "ratio_vs_adamw": {k: v / base for k, v in ms.items()},
        "bytes_per_param": bpp,
        "refactored_amortised_ms": {"all_on": amort_on, "off": amort_off, "interval": interval},
        "regularisers_on_over_off": ms["Refactored (all on, warmup)"] / ms["Refactored (regularisers off)"],
        "regularisers_on_over_base": ms["Refactored (all on, warmup)"] / ms["Automagic_CameAMP"],
        "stable_phase_on_over_base": ms["Refactored (all on, stable phase)"] / ms["Automagic_CameAMP"],
        "eight_bit_state_ratio": bpp["Automagic_CameAMP8bit"] / bpp["Automagic_CameAMP"],
        "nonfinite_guard_cost": {k: ms[k] / ms[f"{k} (skip_nonfinite off)"]
                                 for k in ("Automagic_CameAMP", "Automagic_CameAMP8bit")},
        "coptim_eight_bit_state_ratio": bpp["Automagic_CameAMP_COptim8bit"] / bpp["Automagic_CameAMP_COptim"],
    }
    del opts

    sub = {k: v for k, v in table.items() if k in ("AdamW(foreach)", "Automagic_CameAMP",
                                                    "Refactored (regularisers off)", "Refactored (all on, warmup)")}
    lshapes = locon_shapes(16)
    _, ms2, bpp2, n2 = measure(lshapes, sub, rounds, repeats)
    results["locon_r16_3x3"] = {
        "tensors": len(lshapes), "params": n2, "step_ms": ms2, "bytes_per_param": bpp2,
        "regularisers_on_over_off": ms2["Refactored (all on, warmup)"] / ms2["Refactored (regularisers off)"],
    }

    r = results["lora_r16"]
    print(f"SD1.5 rank-16 LoRA shapes: {r['tensors']} tensors, {r['params'] / 1e6:.2f}M params "
          f"(fastest step of {rounds} round-robin rounds x {repeats} steps, {torch.get_num_threads()} threads)")
    print("| optimizer | ms/step | x AdamW(foreach) | state B/param |")
    print("|---|---|---|---|")
    for k, v in r["step_ms"].items():
        print(f"| {k} | {v:.1f} | {r['ratio_vs_adamw'][k]:.2f} | {r['bytes_per_param'][k]:.3f} |")
    print("non-finite guard (skip_nonfinite on / off): " + ", ".join(
        f"{k} {v:.2f}x" for k, v in r["nonfinite_guard_cost"].items()))
    a = r["refactored_amortised_ms"]
    print(f"refactored, mean over a {a['interval']}-step rank interval: all on {a['all_on']:.1f} ms, off {a['off']:.1f} ms")
    print(f"regularisers on / off: {r['regularisers_on_over_off']:.2f}x; on / Automagic_CameAMP: "
          f"{r['regularisers_on_over_base']:.2f}x; stable phase on / Automagic_CameAMP: {r['stable_phase_on_over_base']:.2f}x")
    print(f"8-bit state / 32-bit twin: Automagic_CameAMP {r['eight_bit_state_ratio']:.3f}, "
          f"COptim {r['coptim_eight_bit_state_ratio']:.3f}")
    lc = results["locon_r16_3x3"]
    print(f"LoCon 3x3 set ({lc['tensors']} tensors, {lc['params'] / 1e6:.2f}M params): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in lc["step_ms"].items())
          + f"; regularisers on / off {lc['regularisers_on_over_off']:.2f}x")
    results["table"] = {
        "ms_per_step_sd15_lora_r16": {k: round(v, 1) for k, v in r["step_ms"].items()},
        "x_adamw_foreach": {k: round(v, 2) for k, v in r["ratio_vs_adamw"].items()},
        "state_bytes_per_param": {k: round(v, 3) for k, v in r["bytes_per_param"].items()},
        "refactored_regularisers_on_over_off": round(r["regularisers_on_over_off"], 2),
        "refactored_on_over_Automagic_CameAMP": round(r["regularisers_on_over_base"], 2),
        "eight_bit_state_over_32_bit_twin": round(r["eight_bit_state_ratio"], 3),
        "locon_3x3_regularisers_on_over_off": round(lc["regularisers_on_over_off"], 2),
    }
    path = write_json("automagic.json" if not args.quick else "automagic_quick.json", results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
