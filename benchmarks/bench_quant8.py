"""Blockwise 8-bit state store: speed against the previous encoder and bitsandbytes, bytes per
element, accuracy.

    python -m benchmarks.bench_quant8 [--quick] [--threads N [N ...]] [--repeats R] [--baseline REV]

Same process, same data, CPU. The 9.44M elements of the SD1.5 rank-16 LoRA set (528 tensors)
are laid out three ways:

- ``lora16x528``: one call per tensor (the per-tensor API);
- ``flat/512K``: one flat fp32 buffer cut into block-aligned calls of 2^19 elements, the way
  an optimizer that keeps its state in flat chunks calls the codec (the case optimised for);
- ``flat9.4M``: the whole buffer in one call.

For each it times quantise and dequantise (block 256) of ``library.optimizers.quant8`` (nearest
and stochastic rounding, and stochastic with ``codes_out=`` / ``absmax_out=`` and decoding with
``out=``, which allocate nothing per call), of the previous implementation of the module
(``--baseline``, a git revision, read with ``git show``; "old" rows) and of
``bitsandbytes.functional`` (whose CPU kernel does nearest only), with Adam-like data: signed map
on N(0, 1e-3) "exp_avg", unsigned map on its square (the optimizers store sqrt(exp_avg_sq)
unsigned; the map and the cost are the same). It also times the lr-mask log codec, measures
state bytes per element on the rank-16, rank-4 and small LoKr sets (ours quantises every
tensor; bitsandbytes' 8-bit optimizers keep tensors under 4096 elements in fp32), and the mean
absolute quantisation error of both implementations.

Implementations are timed in turn inside each repeat (so a busy spell on a shared machine hits
all of them) and every number is the minimum over ``--repeats`` runs (the median is stored
too): other processes only ever add time. Writes benchmarks/results/quant8.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
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
# the last commit of quant8.py with the 2^17-entry lookup-table encoder
BASELINE = "6705429f76b336b44649d8a1b08473a09f213852"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bnb():
    try:
        import bitsandbytes.functional as F  # noqa: N812
        import bitsandbytes
    except Exception as exc:  # pragma: no cover - optional comparison
        print(f"bitsandbytes unavailable ({exc}); measuring ours only")
        return None, None
    return F, bitsandbytes.__version__


def _baseline(rev: str):
    """The module as it was at git revision ``rev`` (None if git or the revision is missing)."""
    if not rev:
        return None, None
    try:
        full = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
        src = subprocess.run(["git", "show", f"{full}:library/optimizers/quant8.py"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"baseline {rev!r} unavailable ({exc}); no 'old' rows")
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix="_quant8_old.py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("quant8_baseline", f.name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    os.unlink(f.name)
    return mod, full


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


def _impls(xs, signed, old, F):
    """{impl: (quantise fn, dequantise fn or None)} on the list of tensors ``xs``."""
    out = {}
    seeds = list(range(len(xs)))
    for name, mod in (("old", old), ("new", q)):
        if mod is None:
            continue
        codes = [mod.quantize_blockwise(x, signed, BLOCK) for x in xs]
        out[f"{name} nearest"] = (
            lambda mod=mod: [mod.quantize_blockwise(x, signed, BLOCK) for x in xs],
            lambda mod=mod, codes=codes: [mod.dequantize_blockwise(c, a, signed) for c, a in codes],
        )
        bufs = [torch.empty_like(x) for x in xs]
        out[f"{name} stochastic"] = (
            lambda mod=mod: [mod.quantize_blockwise(x, signed, BLOCK, rounding="stochastic", seed=i)
                             for i, x in zip(seeds, xs)],
            lambda mod=mod, codes=codes, bufs=bufs: [mod.dequantize_blockwise(c, a, signed, out=o)
                                                     for (c, a), o in zip(codes, bufs)],
        )
    if F is not None:
        code = F.create_dynamic_map(signed)
        bnb_q = [F.quantize_blockwise(x, code=code, blocksize=BLOCK) for x in xs]
        out["bitsandbytes"] = (
            lambda: [F.quantize_blockwise(x, code=code, blocksize=BLOCK) for x in xs],
            lambda: [F.dequantize_blockwise(c, s) for c, s in bnb_q],
        )
    codes = [q.quantize_blockwise(x, signed, BLOCK) for x in xs]
    keep = [(c.clone(), a.clone()) for c, a in codes]
    out["new stochastic in place"] = (
        lambda: [q.quantize_blockwise(x, signed, BLOCK, rounding="stochastic", seed=i, codes_out=c, absmax_out=a)
                 for i, x, (c, a) in zip(seeds, xs, keep)],
        None,
    )
    return out


def bench_throughput(layouts, repeats, F, old):
    rows = []
    for layout, tensors in layouts:
        n = sum(t.numel() for t in tensors["m"])
        for map_name, signed, xs in (("signed", True, tensors["m"]), ("unsigned", False, tensors["v"])):
            impls = _impls(xs, signed, old, F)
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
            fns = {}
            for name, mod in (("old", old), ("new", q)):
                if mod is None:
                    continue
                codes = [mod.quantize_log(x, LO, HI, bits=bits, seed=i) for i, x in enumerate(lrs)]
                fns[(name, "quant")] = lambda mod=mod: [mod.quantize_log(x, LO, HI, bits=bits, seed=i)
                                                        for i, x in enumerate(lrs)]
                fns[(name, "dequant")] = lambda mod=mod, codes=codes: [mod.dequantize_log(c, LO, HI) for c in codes]
            res = timed_all(fns, repeats)
            for name in ("old", "new"):
                if (name, "quant") not in res:
                    continue
                (qm, qmed), (dm, dmed) = res[(name, "quant")], res[(name, "dequant")]
                rows.append({"layout": layout, "map": f"log{bits} [1e-7,1e-3]", "impl": f"{name} stochastic",
                             "elements": n, "calls": len(lrs), "quant_ms": qm, "quant_ms_median": qmed,
                             "dequant_ms": dm, "dequant_ms_median": dmed, "dequant_into": "new tensor"})
                print(f"  {layout:>11s} log{bits:<5d} {name + ' stochastic':>24s}: quant {qm:7.1f} ms, "
                      f"dequant {dm:6.1f} ms", flush=True)
    for r in rows:
        r["quant_Melem_s"] = r["elements"] / r["quant_ms"] / 1e3
        if "dequant_ms" in r:
            r["dequant_Melem_s"] = r["elements"] / r["dequant_ms"] / 1e3
    return rows


def speedups(rows) -> list:
    """new / old time ratios per (layout, map, rounding) where both were measured."""
    idx = {(r["layout"], r["map"], r["impl"]): r for r in rows}
    out = []
    for (layout, map_name, impl), r in idx.items():
        if not impl.startswith("new ") or impl.endswith("in place"):
            continue
        o = idx.get((layout, map_name, "old " + impl[4:]))
        if o is None:
            continue
        row = {"layout": layout, "map": map_name, "rounding": impl[4:],
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


def markdown(rows, speed, bpe, acc) -> str:
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
        lines += ["", "| threads | layout | map | rounding | quantise old/new | dequantise old/new |",
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
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, flat/512K layout only")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch CPU thread counts to time, e.g. --threads 1 2 (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (min is reported)")
    ap.add_argument("--baseline", default=BASELINE,
                    help="git revision of the previous quant8.py for the 'old' rows ('' to skip)")
    ap.add_argument("--out", default=None, help="file name under benchmarks/results/ "
                    "(default quant8.json, quant8_quick.json with --quick)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "quant8_quick.json" if args.quick else "quant8.json"
    thread_counts = args.threads or [torch.get_num_threads()]
    repeats = args.repeats or (3 if args.quick else 9)
    F, bnb_version = _bnb()
    old, old_rev = _baseline(args.baseline)

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
        print(f"quant8 benchmark: threads={threads} repeats={repeats} bnb={bnb_version} baseline={old_rev}")
        r = bench_throughput(layouts, repeats, F, old)
        rows += [{"threads": threads, **row} for row in r]
        speed += [{"threads": threads, **row} for row in speedups(r)]
    bpe = bytes_per_element({"lora_shapes(16)": shapes16, "lora_shapes(4)": lora_shapes(4),
                             "lokr_shapes(16)": lokr_shapes(16)})
    acc = accuracy(m, v, F)
    table = markdown(rows, speed, bpe, acc)
    print()
    print(table)
    path = write_json(args.out, {
        "benchmark": "quant8", "quick": args.quick, "thread_counts": thread_counts, "repeats": repeats,
        "block_size": BLOCK, "flat_chunk": FLAT_CHUNK, "bitsandbytes": bnb_version, "baseline": old_rev,
        "timing": "min over repeats, implementations interleaved within each repeat (median stored as *_median)",
        "throughput": rows, "speedup_new_vs_old": speed, "bytes_per_element": bpe, "mean_abs_error_rel": acc,
        "markdown": table,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
