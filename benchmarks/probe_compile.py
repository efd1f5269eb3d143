"""What ``torch.compile`` makes of AdaptiveHinaAdamW's chunk pipeline as it is written.

    python -m benchmarks.probe_compile [--tensors 64] [--steps 3]

The first ``--tensors`` SD1.5 rank-4 LoRA tensors, the whole group as one chunk (so one compiled
graph serves every step), seed 000's general configuration after its warmup. Reports, in one
process: the eager ms/step; the first compiled step (tracing and compiling included), the second
(a recompile where the step count's phase or a guard changed) and the steady-state ms/step of
``torch.compile(optimizer._update_chunk)``. Writes ``benchmarks/results/probe_compile.json``.

Why it is a probe and not a flag: Dynamo traces the stages through Python, so every view of every
per-tensor list is a graph input with its own guards, and the per-run loops unroll into the graph;
compile time and guard checks grow with the number of tensors. A compiled step worth having
needs the chunk's math as a few functions of flat tensors (docs/optimizers.md, "Speed").
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import make_params, time_steps, write_json
from benchmarks.shapes import lora_shapes


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="steady-state steps timed (the minimum is kept)")
    args = ap.parse_args(argv)

    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW

    torch.set_num_threads(2)
    named = make_params(lora_shapes(4)[:args.tensors])
    params = [p for _, p in named]
    saved = dict(AdaptiveHinaAdamW.chunk_elements)
    AdaptiveHinaAdamW.chunk_elements = {"cpu": 1 << 40}  # the whole group is one chunk
    try:
        opt = AdaptiveHinaAdamW(params, lr=1e-3, warmup_steps=2)
        for _ in range(3):  # past ADOPT's first call and the warmup
            opt.step()
        eager = time_steps(opt, warmup=1, repeats=args.steps)
        opt._update_chunk = torch.compile(opt._update_chunk)
        first = _seconds(opt.step)
        second = _seconds(opt.step)
        compiled = time_steps(opt, warmup=0, repeats=args.steps)
    finally:
        AdaptiveHinaAdamW.chunk_elements = saved
    out = {"tensors": len(params), "params": sum(p.numel() for p in params), "torch": torch.__version__,
           "eager_ms": eager, "first_compiled_step_s": first, "second_compiled_step_s": second,
           "compiled_ms": compiled}
    print(f"{out['tensors']} tensors, {out['params']:,} parameters, torch {torch.__version__}: eager {eager:.1f} ms/step; "
          f"compiled: first step {first:.1f} s, second {second:.1f} s, then {compiled:.1f} ms/step")
    write_json("probe_compile.json", out)
    return out


if __name__ == "__main__":
    main()
