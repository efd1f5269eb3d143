"""Blockwise 8-bit state store: speed against bitsandbytes, bytes per element, accuracy.

    python -m benchmarks.bench_quant8 [--quick] [--threads N [N ...]] [--repeats R]

Same process, same data, CPU. For the SD1.5 rank-16 LoRA set (528 tensors, 9.4M elements)
and for the same 9.4M elements as one flat tensor it times quantise and dequantise
(block 256) of ``library.optimizers.quant8`` (nearest and stochastic rounding) and of
``bitsandbytes.functional`` (whose CPU kernel does nearest only), with Adam-like data:
signed map on N(0, 1e-3) "exp_avg", unsigned map on its square "exp_avg_sq". It also times
the lr-mask log codec, measures state bytes per element on the rank-16, rank-4 and small
LoKr sets (ours quantises every tensor; bitsandbytes' 8-bit optimizers keep tensors under
4096 elements in fp32), and the mean absolute quantisation error of both implementations.

Times are the minimum over ``--repeats`` runs (the median is stored too): other processes on
a shared machine only ever add time. Writes benchmarks/results/quant8.json.
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
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit default: smaller tensors stay fp32
LO, HI = 1e-7, 1e-3


def _bnb():
    try:
        import bitsandbytes.functional as F  # noqa: N812
        import bitsandbytes
    except Exception as exc:  # pragma: no cover - optional comparison
        print(f"bitsandbytes unavailable ({exc}); measuring ours only")
        return None, None
    return F, bitsandbytes.__version__


def timed(fn, repeats: int) -> tuple[float, float]:
    """(min, median) wall time of fn() in ms, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts), 1e3 * statistics.median(ts)


def make_data(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = [torch.randn(s, generator=gen).mul_(1e-3) for _, s in shapes]
    v = [t.square() for t in m]
    return m, v


def bench_throughput(layouts, repeats, F):
    rows = []
    for layout, tensors in layouts:
        n = sum(t.numel() for t in tensors["m"])
        for map_name, signed, xs in (("signed", True, tensors["m"]), ("unsigned", False, tensors["v"])):
            impls = {}
            ours_n = [q.quantize_blockwise(x, signed, BLOCK) for x in xs]
            impls["ours nearest"] = (
                lambda xs=xs, signed=signed: [q.quantize_blockwise(x, signed, BLOCK) for x in xs],
                lambda ours_n=ours_n, signed=signed: [q.dequantize_blockwise(c, a, signed) for c, a in ours_n],
            )
            impls["ours stochastic"] = (
                lambda xs=xs, signed=signed: [
                    q.quantize_blockwise(x, signed, BLOCK, rounding="stochastic", seed=i) for i, x in enumerate(xs)],
                None,  # dequantisation does not depend on the rounding mode
            )
            if F is not None:
                code = F.create_dynamic_map(signed)
                bnb_q = [F.quantize_blockwise(x, code=code, blocksize=BLOCK) for x in xs]
                impls["bitsandbytes"] = (
                    lambda xs=xs, code=code: [F.quantize_blockwise(x, code=code, blocksize=BLOCK) for x in xs],
                    lambda bnb_q=bnb_q: [F.dequantize_blockwise(c, s) for c, s in bnb_q],
                )
            for impl, (fq, fdq) in impls.items():
                q_min, q_med = timed(fq, repeats)
                row = {"layout": layout, "map": map_name, "impl": impl, "elements": n,
                       "quant_ms": q_min, "quant_ms_median": q_med}
                if fdq is not None:
                    d_min, d_med = timed(fdq, repeats)
                    row.update(dequant_ms=d_min, dequant_ms_median=d_med)
                rows.append(row)
                print(f"  {layout:>10s} {map_name:>8s} {impl:>16s}: quant {q_min:7.1f} ms"
                      + (f", dequant {row['dequant_ms']:6.1f} ms" if fdq is not None else ""), flush=True)
        # lr-mask codec on the same element count (values spread log-uniformly over the range)
        gen = torch.Generator().manual_seed(1)
        lrs = [torch.rand(t.shape, generator=gen).mul_(math.log(HI / LO)).add_(math.log(LO)).exp_()
               for t in tensors["m"]]
        for bits in (8, 16):
            codes = [q.quantize_log(x, LO, HI, bits=bits, seed=i) for i, x in enumerate(lrs)]
            q_min, q_med = timed(lambda: [q.quantize_log(x, LO, HI, bits=bits, seed=i) for i, x in enumerate(lrs)],
                                 repeats)
            d_min, d_med = timed(lambda: [q.dequantize_log(c, LO, HI) for c in codes], repeats)
            rows.append({"layout": layout, "map": f"log{bits} [1e-7,1e-3]", "impl": "ours stochastic",
                         "elements": n, "quant_ms": q_min, "quant_ms_median": q_med,
                         "dequant_ms": d_min, "dequant_ms_median": d_med})
            print(f"  {layout:>10s} log{bits:<5d} {'ours stochastic':>16s}: quant {q_min:7.1f} ms, "
                  f"dequant {d_min:6.1f} ms", flush=True)
    for r in rows:
        r["quant_Melem_s"] = r["elements"] / r["quant_ms"] / 1e3
        if "dequant_ms" in r:
            r["dequant_Melem_s"] = r["elements"] / r["dequant_ms"] / 1e3
    return rows


def bytes_per_element(shape_sets):
    out = {}
    for set_name, shapes in shape_sets.items():
        n_total = 0
        ours = 0
        bnb_policy = 0
        small = 0
        for _, shape in shapes:
            x = torch.randn(shape)
            codes, absmax = q.quantize_blockwise(x, True, BLOCK)
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
        num = {"ours nearest": 0.0, "ours stochastic": 0.0, "bitsandbytes": 0.0}
        den = 0.0
        for i, x in enumerate(xs):
            den += float(x.abs().sum())
            c, a = q.quantize_blockwise(x, signed, BLOCK)
            num["ours nearest"] += float((q.dequantize_blockwise(c, a, signed) - x).abs().sum())
            c, a = q.quantize_blockwise(x, signed, BLOCK, rounding="stochastic", seed=i)
            num["ours stochastic"] += float((q.dequantize_blockwise(c, a, signed) - x).abs().sum())
            if F is not None:
                c, s = F.quantize_blockwise(x, code=F.create_dynamic_map(signed), blocksize=BLOCK)
                num["bitsandbytes"] += float((F.dequantize_blockwise(c, s) - x).abs().sum())
        out[map_name] = {k: val / den for k, val in num.items() if F is not None or k != "bitsandbytes"}
    return out


def markdown(rows, bpe, acc) -> str:
    lines = ["| threads | layout | map | impl | quantise ms | dequantise ms | quantise M el/s | dequantise M el/s |",
             "|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        dq = f"{r['dequant_ms']:.1f}" if "dequant_ms" in r else "="
        dqs = f"{r['dequant_Melem_s']:.0f}" if "dequant_ms" in r else "="
        lines.append(f"| {r['threads']} | {r['layout']} | {r['map']} | {r['impl']} | {r['quant_ms']:.1f} | {dq} | "
                     f"{r['quant_Melem_s']:.0f} | {dqs} |")
    lines += ["", "| shape set | tensors (<4096 el) | elements | ours B/el | bnb 8-bit optimizer B/el | fp32 B/el "
              "| lr mask log8 / log16 B/el |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, b in bpe.items():
        lines.append(f"| {name} | {b['tensors']} ({b['tensors_below_4096']}) | {b['elements']:,} | {b['ours']:.4f} | "
                     f"{b['bnb_optimizer_policy']:.4f} | 4 | {b['lr_mask_log8']:.0f} / {b['lr_mask_log16']:.0f} |")
    lines += ["", "| map | " + " | ".join(next(iter(acc.values())).keys()) + " |",
              "|---|" + "---:|" * len(next(iter(acc.values())))]
    for name, a in acc.items():
        lines.append(f"| {name} mean abs err / mean abs | " + " | ".join(f"{v:.4%}" for v in a.values()) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, LoRA layout only")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch CPU thread counts to time, e.g. --threads 1 2 (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (min is reported)")
    ap.add_argument("--out", default="quant8.json", help="file name under benchmarks/results/")
    args = ap.parse_args(argv)
    thread_counts = args.threads or [torch.get_num_threads()]
    repeats = args.repeats or (2 if args.quick else 7)
    F, bnb_version = _bnb()

    shapes16 = lora_shapes(16)
    m, v = make_data(shapes16)
    layouts = [("lora16x528", {"m": m, "v": v})]
    if not args.quick:
        layouts.append(("flat9.4M", {"m": [torch.cat([t.reshape(-1) for t in m])],
                                     "v": [torch.cat([t.reshape(-1) for t in v])]}))
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"quant8 benchmark: threads={threads} repeats={repeats} bnb={bnb_version}")
        for row in bench_throughput(layouts, repeats, F):
            rows.append({"threads": threads, **row})
    bpe = bytes_per_element({"lora_shapes(16)": shapes16, "lora_shapes(4)": lora_shapes(4),
                             "lokr_shapes(16)": lokr_shapes(16)})
    acc = accuracy(m, v, F)
    table = markdown(rows, bpe, acc)
    print()
    print(table)
    path = write_json(args.out, {
        "benchmark": "quant8", "quick": args.quick, "thread_counts": thread_counts, "repeats": repeats,
        "block_size": BLOCK, "bitsandbytes": bnb_version, "timing": "min over repeats (median stored as *_median)",
        "throughput": rows, "bytes_per_element": bpe, "mean_abs_error_rel": acc, "markdown": table,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
