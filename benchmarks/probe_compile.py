"""What ``torch.compile`` makes of AdaptiveHinaAdamW's chunk pipeline as it is written.

    python -m benchmarks.probe_compile [--tensors 64] [--steps 3]
    python -m benchmarks.probe_compile --codec [--steps 20]

The first ``--tensors`` SD1.5 rank-4 LoRA tensors, the whole group as one chunk (so one compiled
graph serves every step), seed 000's general configuration after its warmup. Reports, in one
process: the eager ms/step; the first compiled step (tracing and compiling included), the second
(a recompile where the step count's phase or a guard changed) and the steady-state ms/step of
``torch.compile(optimizer._update_chunk)``. Writes ``benchmarks/results/probe_compile.json``.

Why it is a probe and not a flag: Dynamo traces the stages through Python, so every view of every
per-tensor list is a graph input with its own guards, and the per-run loops unroll into the graph;
compile time and guard checks grow with the number of tensors. A compiled step worth having
needs the chunk's math as a few functions of flat tensors (docs/optimizers.md, "Speed").

``--codec`` asks the same of the 8-bit codec, the part of the 8-bit step that already is a function
of flat tensors: one chunk (2^18 elements, what the codec encodes at once) of the signed float8 map,
encoded with stochastic rounding and decoded by the library (eager) and by ``torch.compile`` of
the same arithmetic written as one function (``fullgraph=True``, static shapes). Reports the compile
time, whether the compiled codes and values are bit-identical, and the fastest of ``--steps`` calls
each; writes ``benchmarks/results/probe_compile_codec.json``.
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


def _fastest_ms(fn, repeats: int) -> float:
    return 1e3 * min(_seconds(fn) for _ in range(repeats))


def _encode_f8(xb, noise, m: int, c: float, floor: float):
    """The signed float8 encoder of ``quant8/float8.py`` (block absmax, x / absmax * C, codes read
    off the bit pattern with the noise added below the kept bits) as one function."""
    absmax = torch.maximum(xb.amax(1), xb.amin(1).neg()).clamp(min=floor)
    absmax = absmax.nan_to_num(nan=float("nan"), posinf=float("nan"))
    zi = ((xb / absmax.unsqueeze(1)) * c).view(torch.int32)
    codes = ((zi + noise.view(xb.shape)) >> (23 - m)) - (zi >> 31) * 128
    return codes.to(torch.uint8), absmax


def _decode_f8(codes, absmax, m: int, c: float):
    """The signed float8 decoder of ``quant8/float8.py`` as one function."""
    sh = 23 - m
    ri = (codes.view(torch.int8).to(torch.int32) << sh) & (-(1 << 31) | ((1 << (sh + 7)) - 1))
    return (ri.view(torch.float32) / c) * absmax.unsqueeze(1)


def codec_probe(repeats: int) -> dict:
    """Eager library codec against the compiled one-function codec on one chunk (module docstring)."""
    from library.optimizers import quant8
    from library.optimizers.quant8 import _engine, float8

    n, block = _engine._CHUNK, quant8.DEFAULT_BLOCK_SIZE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen) * torch.rand(n // block, 1, generator=gen).repeat_interleave(block, 0).view(-1)
    m, c = float8._F8_M[True], float8._F8_C[True]
    noise = float8.segment_noise(True, [(0, n, 7)], n, x.device)
    codes = torch.empty(n, dtype=torch.int8)
    absmax = torch.empty(n // block)
    values = torch.empty(n)

    def eager_encode():
        quant8.quantize_float8(x, signed=True, block_size=block, codes_out=codes, absmax_out=absmax, noise=noise)

    def eager_decode():
        quant8.dequantize_float8(codes, absmax, signed=True, block_size=block, out=values)

    eager_encode()
    eager_decode()
    enc = torch.compile(_encode_f8, dynamic=False, fullgraph=True)
    dec = torch.compile(_decode_f8, dynamic=False, fullgraph=True)
    xb = x.view(-1, block)
    enc_compile_s = _seconds(lambda: enc(xb, noise, m, c, _engine.ABSMAX_FLOOR))
    c2, a2 = enc(xb, noise, m, c, _engine.ABSMAX_FLOOR)
    dec_compile_s = _seconds(lambda: dec(codes.view(torch.uint8).view(-1, block), absmax, m, c))
    v2 = dec(codes.view(torch.uint8).view(-1, block), absmax, m, c)
    out = {
        "elements": n, "block": block, "torch": torch.__version__,
        "encode_identical": bool(torch.equal(c2.view(-1), codes.view(torch.uint8)) and torch.equal(a2, absmax)),
        "decode_identical": bool(torch.equal(v2.view(-1), values)),
        "encode_compile_s": enc_compile_s, "decode_compile_s": dec_compile_s,
        "eager_encode_ms": _fastest_ms(eager_encode, repeats),
        "compiled_encode_ms": _fastest_ms(lambda: enc(xb, noise, m, c, _engine.ABSMAX_FLOOR), repeats),
        "eager_decode_ms": _fastest_ms(eager_decode, repeats),
        "compiled_decode_ms": _fastest_ms(lambda: dec(codes.view(torch.uint8).view(-1, block), absmax, m, c), repeats),
    }
    print(f"float8 codec, one chunk of {n:,} elements, torch {torch.__version__}: encode eager "
          f"{out['eager_encode_ms']:.3f} ms, compiled {out['compiled_encode_ms']:.3f} ms (compile "
          f"{enc_compile_s:.1f} s, identical: {out['encode_identical']}); decode eager {out['eager_decode_ms']:.3f} ms, "
          f"compiled {out['compiled_decode_ms']:.3f} ms (compile {dec_compile_s:.1f} s, identical: "
          f"{out['decode_identical']})")
    write_json("probe_compile_codec.json", out)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="steady-state steps timed (the minimum is kept)")
    ap.add_argument("--codec", action="store_true", help="probe the 8-bit codec instead (module docstring)")
    args = ap.parse_args(argv)
    if args.codec:
        torch.set_num_threads(2)
        return codec_probe(max(args.steps, 20))

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
