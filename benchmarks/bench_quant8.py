"""Blockwise 8-bit state store: the float8 map (what the optimizers use) against the dynamic
map (kept for reading older checkpoints) and bitsandbytes; bytes per element; accuracy; how
well an 8-bit Adam state tracks fp32 over many steps.

    python -m benchmarks.bench_quant8 [--quick] [--threads N [N ...]] [--repeats R]

Same process, same data, CPU. The 9.44M elements of the SD1.5 rank-16 LoRA set (528 tensors)
are laid out three ways:

- ``lora16x528``: one call per tensor (the per-tensor API, as the Automagic family calls it);
- ``flat/512K``: one flat fp32 buffer cut into block-aligned calls of 2^19 elements, the way
  AdaptiveHinaAdamW / HinaAdamWOptimizer call the codec on a chunk's arena slice;
- ``flat9.4M``: the whole buffer in one call.

For each it times quantise and dequantise (block 256) with both maps of
``library.optimizers.quant8`` (nearest and stochastic rounding; stochastic also with
``codes_out=`` / ``absmax_out=`` and decoding with ``out=``, which allocate nothing per call)
and with ``bitsandbytes.functional`` (dynamic map; its CPU kernel rounds to nearest only), on
Adam-like data: signed map on N(0, 1e-3) "exp_avg", unsigned map on its square. It also times
the lr-mask log codec (the Automagic family's 8-bit masks), measures state bytes per element on
the rank-16, rank-4 and small LoKr sets (we quantise every tensor; bitsandbytes' 8-bit
optimizers keep tensors under 4096 elements in fp32), the mean absolute quantisation error, and
EMA tracking: Adam's m (beta 0.9) and sqrt(v) (beta 0.999) stored in 8 bits and requantised
every step for 2,000 steps of noisy gradients, relative RMS error against the fp32 EMAs and of
the resulting update m / sqrt(v); and how far 8-bit AdamW (AdaptiveHinaAdamW with every feature
off) ends from torch.optim.AdamW on the noisy quadratic of tests/test_state_8bit.py, with the
float8 store and with the dynamic map swapped into the same code path.

Implementations are timed in turn inside each repeat (so a busy spell on a shared machine hits
all of them) and every number is the minimum over ``--repeats`` runs (the median is stored
too): other processes only ever add time. Writes benchmarks/results/quant8.json.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from benchmarks.shapes import lokr_shapes, lora_shapes  # noqa: E402
from library.optimizers import quant8 as q  # noqa: E402

BLOCK = 256
FLAT_CHUNK = 1 << 19  # elements per call in the "flat/512K" layout (block-aligned)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit default: smaller tensors stay fp32
LO, HI = 1e-7, 1e-3
CODECS = {"float8": (q.quantize_float8, q.dequantize_float8),
          "dynamic": (q.quantize_blockwise, q.dequantize_blockwise)}


def _bnb():
    try:
        import bitsandbytes.functional as F  # noqa: N812
        import bitsandbytes
    except Exception as exc:  # pragma: no cover - optional comparison
        print(f"bitsandbytes unavailable ({exc}); measuring ours only")
        return None, None
    return F, bitsandbytes.__version__


def timed_all(fns: dict, repeats: int) -> dict:
    """{name: (min ms, median ms)}: every fn once as warm-up, then ``repeats`` rounds in which
    each fn runs once (interleaved, so load spikes are shared)."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: (1e3 * min(v), 1e3 * statistics.median(v)) for k, v in ts.items()}


def make_data(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = [torch.randn(s, generator=gen).mul_(1e-3) for _, s in shapes]
    v = [t.square() for t in m]
    return m, v


def _impls(xs, signed, F):
    """{impl: (quantise fn, dequantise fn or None)} on the list of tensors ``xs``."""
    out = {}
    seeds = list(range(len(xs)))
    for name, (fq, fd) in CODECS.items():
        codes = [fq(x, signed, BLOCK) for x in xs]
        out[f"{name} nearest"] = (
            lambda fq=fq: [fq(x, signed, BLOCK) for x in xs],
            lambda fd=fd, codes=codes: [fd(c, a, signed) for c, a in codes],
        )
        bufs = [torch.empty_like(x) for x in xs]
        out[f"{name} stochastic"] = (
            lambda fq=fq: [fq(x, signed, BLOCK, rounding="stochastic", seed=i) for i, x in zip(seeds, xs)],
            lambda fd=fd, codes=codes, bufs=bufs: [fd(c, a, signed, out=o) for (c, a), o in zip(codes, bufs)],
        )
        keep = [(c.clone(), a.clone()) for c, a in codes]
        out[f"{name} stochastic in place"] = (
            lambda fq=fq, keep=keep: [fq(x, signed, BLOCK, rounding="stochastic", seed=i, codes_out=c, absmax_out=a)
                                      for i, x, (c, a) in zip(seeds, xs, keep)],
            None,
        )
    if F is not None:
        code = F.create_dynamic_map(signed)
        bnb_q = [F.quantize_blockwise(x, code=code, blocksize=BLOCK) for x in xs]
        out["bitsandbytes"] = (
            lambda: [F.quantize_blockwise(x, code=code, blocksize=BLOCK) for x in xs],
            lambda: [F.dequantize_blockwise(c, s) for c, s in bnb_q],
        )
    return out


def bench_throughput(layouts, repeats, F):
    rows = []
    for layout, tensors in layouts:
        n = sum(t.numel() for t in tensors["m"])
        for map_name, signed, xs in (("signed", True, tensors["m"]), ("unsigned", False, tensors["v"])):
            impls = _impls(xs, signed, F)
            fns = {}
            for impl, (fq, fdq) in impls.items():
                fns[(impl, "quant")] = fq
                if fdq is not None:
                    fns[(impl, "dequant")] = fdq
            res = timed_all(fns, repeats)
            for impl in impls:
                qm, qmed = res[(impl, "quant")]
                row = {"layout": layout, "map": map_name, "impl": impl, "elements": n, "calls": len(xs),
                       "quant_ms": qm, "quant_ms_median": qmed}
                if (impl, "dequant") in res:
                    row["dequant_ms"], row["dequant_ms_median"] = res[(impl, "dequant")]
                    row["dequant_into"] = "out=" if impl.endswith("stochastic") else "new tensor"
                rows.append(row)
                dq = f", dequant {row['dequant_ms']:6.1f} ms ({row['dequant_into']})" if "dequant_ms" in row else ""
                print(f"  {layout:>11s} {map_name:>8s} {impl:>24s}: quant {qm:7.1f} ms{dq}", flush=True)
        # lr-mask codec on the same element count (values spread log-uniformly over the range)
        gen = torch.Generator().manual_seed(1)
        lrs = [torch.rand(t.shape, generator=gen).mul_(math.log(HI / LO)).add_(math.log(LO)).exp_()
               for t in tensors["m"]]
        for bits in (8, 16):
            codes = [q.quantize_log(x, LO, HI, bits=bits, seed=i) for i, x in enumerate(lrs)]
            fns = {("log", "quant"): lambda: [q.quantize_log(x, LO, HI, bits=bits, seed=i) for i, x in enumerate(lrs)],
                   ("log nearest", "quant"): lambda: [q.quantize_log(x, LO, HI, bits=bits, rounding="nearest")
                                                      for x in lrs],  # a mask on its lattice (lr_mask.lattice)
                   ("log", "dequant"): lambda codes=codes: [q.dequantize_log(c, LO, HI) for c in codes]}
            res = timed_all(fns, repeats)
            (dm, dmed) = res[("log", "dequant")]
            for impl, name in (("log stochastic", "log"), ("log nearest", "log nearest")):
                qm, qmed = res[(name, "quant")]
                rows.append({"layout": layout, "map": f"log{bits} [1e-7,1e-3]", "impl": impl,
                             "elements": n, "calls": len(lrs), "quant_ms": qm, "quant_ms_median": qmed,
                             "dequant_ms": dm, "dequant_ms_median": dmed, "dequant_into": "new tensor"})
                print(f"  {layout:>11s} log{bits:<5d} {impl:>24s}: quant {qm:7.1f} ms, "
                      f"dequant {dm:6.1f} ms", flush=True)
    for r in rows:
        r["quant_Melem_s"] = r["elements"] / r["quant_ms"] / 1e3
        if "dequant_ms" in r:
            r["dequant_Melem_s"] = r["elements"] / r["dequant_ms"] / 1e3
    return rows


def speedups(rows) -> list:
    """dynamic / float8 time ratios per (layout, map, rounding)."""
    idx = {(r["layout"], r["map"], r["impl"]): r for r in rows}
    out = []
    for (layout, map_name, impl), r in idx.items():
        if not impl.startswith("float8 "):
            continue
        o = idx.get((layout, map_name, "dynamic " + impl[7:]))
        if o is None:
            continue
        row = {"layout": layout, "map": map_name, "rounding": impl[7:],
               "quant_speedup": o["quant_ms"] / r["quant_ms"]}
        if "dequant_ms" in r and "dequant_ms" in o:
            row["dequant_speedup"] = o["dequant_ms"] / r["dequant_ms"]
        out.append(row)
    return out


def bytes_per_element(shape_sets):
    out = {}
    for set_name, shapes in shape_sets.items():
        n_total = 0
        ours = 0
        bnb_policy = 0
        small = 0
        for _, shape in shapes:
            x = torch.randn(shape)
            codes, absmax = q.quantize_float8(x, True, BLOCK)
            n = x.numel()
            n_total += n
            ours += codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
            if n < BNB_MIN_8BIT_SIZE:
                bnb_policy += 4 * n
                small += 1
            else:
                bnb_policy += n + 4 * math.ceil(n / BLOCK)
        lr8 = sum(q.quantize_log(torch.full(s, 1e-5), LO, HI, bits=8, seed=0).nbytes for _, s in shapes)
        lr16 = sum(q.quantize_log(torch.full(s, 1e-5), LO, HI, bits=16, seed=0).nbytes for _, s in shapes)
        out[set_name] = {
            "tensors": len(shapes), "elements": n_total, "tensors_below_4096": small,
            "ours": ours / n_total, "bnb_optimizer_policy": bnb_policy / n_total, "fp32": 4.0,
            "lr_mask_log8": lr8 / n_total, "lr_mask_log16": lr16 / n_total,
        }
    return out


def accuracy(m, v, F):
    """Mean |deq - x| / mean |x| per implementation on the rank-16 LoRA data."""
    out = {}
    for map_name, signed, xs in (("signed", True, m), ("unsigned", False, v)):
        num = {f"{c} {r}": 0.0 for c in CODECS for r in ("nearest", "stochastic")}
        if F is not None:
            num["bitsandbytes"] = 0.0
        den = 0.0
        for i, x in enumerate(xs):
            den += float(x.abs().sum())
            for c, (fq, fd) in CODECS.items():
                codes, a = fq(x, signed, BLOCK)
                num[f"{c} nearest"] += float((fd(codes, a, signed) - x).abs().sum())
                codes, a = fq(x, signed, BLOCK, rounding="stochastic", seed=i)
                num[f"{c} stochastic"] += float((fd(codes, a, signed) - x).abs().sum())
            if F is not None:
                c, s = F.quantize_blockwise(x, code=F.create_dynamic_map(signed), blocksize=BLOCK)
                num["bitsandbytes"] += float((F.dequantize_blockwise(c, s) - x).abs().sum())
        out[map_name] = {k: val / den for k, val in num.items()}
    return out


def ema_tracking(steps: int = 2000, n: int = 1 << 16, seed: int = 0) -> dict:
    """Adam's m and sqrt(v) kept in 8 bits (requantised every step) against fp32 EMAs.

    Gradient of element i: N(mu_i, s_i) with s_i log-uniform over 1e-5..1e-2 (so one block
    holds magnitudes three decades apart) and mu_i = 0.3 s_i. Reports the relative RMS error
    of m, of v and of the update m / (sqrt(v) + 1e-8) after ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=gen).mul_(math.log(1e3)).exp_().mul_(1e-5)
    mu = 0.3 * s
    out = {}
    variants = [(c, r) for c in CODECS for r in ("stochastic", "nearest")]
    for codec, rounding in variants:
        fq, fd = CODECS[codec]
        m32, v32 = torch.zeros(n), torch.zeros(n)
        mq, mqa = fq(torch.zeros(n), True, BLOCK)
        rq, rqa = fq(torch.zeros(n), False, BLOCK)
        g_gen = torch.Generator().manual_seed(seed + 1)
        for t in range(1, steps + 1):
            g = torch.randn(n, generator=g_gen).mul_(s).add_(mu)
            m32.lerp_(g, 0.1)
            v32.mul_(0.999).addcmul_(g, g, value=0.001)
            m8 = fd(mq, mqa, True).lerp_(g, 0.1)
            v8 = fd(rq, rqa, False).square_().mul_(0.999).addcmul_(g, g, value=0.001)
            kw = {"rounding": rounding} if rounding == "nearest" else {"rounding": rounding, "seed": q.mix_seed(seed, t)}
            mq, mqa = fq(m8, True, BLOCK, **kw)
            rq, rqa = fq(v8.sqrt_(), False, BLOCK, **kw)
        m8, v8 = fd(mq, mqa, True), fd(rq, rqa, False).square_()

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        u32, u8 = m32 / (v32.sqrt() + 1e-8), m8 / (v8.sqrt() + 1e-8)
        out[f"{codec} {rounding}"] = {"m": rel(m8, m32), "v": rel(v8, v32), "update": rel(u8, u32)}
    return out


def _in_place_of_float8(quantize):
    """``quantize`` with the float8 encoder's call signature: the arenas pass ``noise`` (per-tensor
    rounding streams, None for AdaptiveHinaAdamW's one stream per chunk), which the dynamic map's
    encoder does not take."""
    if quantize is q.quantize_float8:
        return quantize

    def encode(x, *args, noise=None, **kwargs):
        if noise is not None:
            raise ValueError("per-tensor rounding streams are float8-only")
        return quantize(x, *args, **kwargs)

    return encode


def adamw_tracking(steps: int = 150, seeds=(1, 2, 3, 4, 5)) -> dict:
    """AdaptiveHinaAdamW(optim_bits=8) with every feature off against torch.optim.AdamW on the
    noisy quadratic of tests/test_state_8bit.py (lr 1e-2, weight decay 0.01, 150 steps): the
    largest relative parameter distance over its three tensors, per seed, with the shipped
    float8 store and, for comparison, with the dynamic map swapped into the same code path."""
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
    from tests.helpers import quadratic_params, run_quadratic

    off = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
               use_grams=False, use_agr=False, use_tam=False, use_dynamic_adaptation=False, use_lr_mask=False, use_hypergrad=False,
               dynamic_weight_decay=False)
    shipped = q.quantize_float8, q.dequantize_float8
    out = {}
    try:
        for name, (fq, fd) in CODECS.items():
            q.quantize_float8, q.dequantize_float8 = _in_place_of_float8(fq), fd
            dist = []
            for seed in seeds:
                a = quadratic_params(shapes=((64, 32), (32,), (16, 8, 3, 3)))
                b = [torch.nn.Parameter(p.detach().clone()) for p in a]
                run_quadratic(torch.optim.AdamW(b, lr=1e-2, weight_decay=0.01), b, steps, seed=seed)
                run_quadratic(AdaptiveHinaAdamW(a, lr=1e-2, weight_decay=0.01, optim_bits=8, **off), a, steps, seed=seed)
                dist.append(max(float((x - y).detach().norm() / y.detach().norm()) for x, y in zip(a, b)))
            out[name] = {"per_seed": dist, "mean": sum(dist) / len(dist), "max": max(dist)}
    finally:
        q.quantize_float8, q.dequantize_float8 = shipped
    return out


def markdown(rows, speed, bpe, acc, ema, track) -> str:
    lines = ["| threads | layout | map | impl | quantise ms | dequantise ms | quantise M el/s | dequantise M el/s |",
             "|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        dq = f"{r['dequant_ms']:.1f}" if "dequant_ms" in r else "-"
        if r.get("dequant_into") == "out=":
            dq += " (out=)"
        dqs = f"{r['dequant_Melem_s']:.0f}" if "dequant_ms" in r else "-"
        lines.append(f"| {r['threads']} | {r['layout']} | {r['map']} | {r['impl']} | {r['quant_ms']:.1f} | {dq} | "
                     f"{r['quant_Melem_s']:.0f} | {dqs} |")
    if speed:
        lines += ["", "| threads | layout | map | rounding | quantise dynamic/float8 | dequantise dynamic/float8 |",
                  "|---:|---|---|---|---:|---:|"]
        for s in speed:
            dq = f"{s['dequant_speedup']:.2f}x" if "dequant_speedup" in s else "-"
            lines.append(f"| {s['threads']} | {s['layout']} | {s['map']} | {s['rounding']} | "
                         f"{s['quant_speedup']:.2f}x | {dq} |")
    lines += ["", "| shape set | tensors (<4096 el) | elements | ours B/el | bnb 8-bit optimizer B/el | fp32 B/el "
              "| lr mask log8 / log16 B/el |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, b in bpe.items():
        lines.append(f"| {name} | {b['tensors']} ({b['tensors_below_4096']}) | {b['elements']:,} | {b['ours']:.4f} | "
                     f"{b['bnb_optimizer_policy']:.4f} | 4 | {b['lr_mask_log8']:.0f} / {b['lr_mask_log16']:.0f} |")
    lines += ["", "| map | " + " | ".join(next(iter(acc.values())).keys()) + " |",
              "|---|" + "---:|" * len(next(iter(acc.values())))]
    for name, a in acc.items():
        lines.append(f"| {name} mean abs err / mean abs | " + " | ".join(f"{v:.4%}" for v in a.values()) + " |")
    lines += ["", "EMA tracking (2,000 steps, m beta 0.9, sqrt(v) beta 0.999, requantised every step; relative RMS "
              "error against fp32):", "", "| codec | m | v | update m/sqrt(v) |", "|---|---:|---:|---:|"]
    for name, e in ema.items():
        lines.append(f"| {name} | {e['m']:.2%} | {e['v']:.2%} | {e['update']:.2%} |")
    lines += ["", "8-bit AdamW (AdaptiveHinaAdamW, every feature off, optim_bits=8) against torch.optim.AdamW on "
              "the noisy quadratic of tests/test_state_8bit.py after 150 steps: largest relative parameter "
              "distance, over 5 seeds:", "", "| store | mean | max |", "|---|---:|---:|"]
    for name, t in track.items():
        lines.append(f"| {name} | {t['mean']:.2%} | {t['max']:.2%} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, flat/512K layout only")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch CPU thread counts to time, e.g. --threads 1 2 (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (min is reported)")
    ap.add_argument("--out", default=None, help="file name under benchmarks/results/ "
                    "(default quant8.json, quant8_quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "quant8_quick.json" if args.quick else "quant8.json"
    thread_counts = args.threads or [torch.get_num_threads()]
    repeats = args.repeats or (3 if args.quick else 9)
    F, bnb_version = _bnb()

    shapes16 = lora_shapes(16)
    m, v = make_data(shapes16)
    flat_m = torch.cat([t.reshape(-1) for t in m])
    flat_v = torch.cat([t.reshape(-1) for t in v])
    layouts = [("flat/512K", {"m": list(flat_m.split(FLAT_CHUNK)), "v": list(flat_v.split(FLAT_CHUNK))})]
    if not args.quick:
        layouts = [("lora16x528", {"m": m, "v": v})] + layouts + [("flat9.4M", {"m": [flat_m], "v": [flat_v]})]
    rows, speed = [], []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"quant8 benchmark: threads={threads} repeats={repeats} bnb={bnb_version}")
        r = bench_throughput(layouts, repeats, F)
        rows += [{"threads": threads, **row} for row in r]
        speed += [{"threads": threads, **row} for row in speedups(r)]
    bpe = bytes_per_element({"lora_shapes(16)": shapes16, "lora_shapes(4)": lora_shapes(4),
                             "lokr_shapes(16)": lokr_shapes(16)})
    acc = accuracy(m, v, F)
    ema = ema_tracking(steps=500 if args.quick else 2000)
    track = adamw_tracking()
    table = markdown(rows, speed, bpe, acc, ema, track)
    print()
    print(table)
    path = write_json(args.out, {
        "benchmark": "quant8", "quick": args.quick, "thread_counts": thread_counts, "repeats": repeats,
        "block_size": BLOCK, "flat_chunk": FLAT_CHUNK, "bitsandbytes": bnb_version,
        "timing": "min over repeats, implementations interleaved within each repeat (median stored as *_median)",
        "throughput": rows, "speedup_float8_vs_dynamic": speed, "bytes_per_element": bpe,
        "mean_abs_error_rel": acc, "ema_tracking": ema, "adamw_quadratic_tracking": track,
        "markdown": table,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
