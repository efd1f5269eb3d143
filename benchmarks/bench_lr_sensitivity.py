"""How much the lr you pick matters: each optimizer over a fixed lr grid on the quality tasks.

    python -m benchmarks.bench_lr_sensitivity [--jobs 2] [--quick]

Runs each contender below at every lr of ``LR_GRID`` (factor sqrt(10) steps, 1e-5 .. 1e-1) as
``bench_quality`` runs an untuned contender (same tasks, seeds, cosine schedule with 5% warmup,
warmup/transition lengths scaled to the run), on the three short tasks with the report seeds
1, 2, 3 and on ``tiny_sd_long`` with seed 1 at every other lr. Each cell is the no-tune score
(start - final) / (start - tuned AdamW final), with start and tuned AdamW taken from
``benchmarks/results/quality.json`` (run ``make bench-quality`` first). The *span* of a contender
on a task is max lr / min lr over the grid points scoring at least 0.9 that are contiguous with
its best point: how far off the lr can be and still train about as well as tuned AdamW.

``--quick``: seed 1 only and the short tasks only (about 2 minutes on 2 cores).
Writes ``benchmarks/results/lr_sensitivity.json`` (``lr_sensitivity_quick.json``); the markdown
section is rendered by ``benchmarks/run_all.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from benchmarks.probe_quality import reference
from benchmarks.quality.contenders import Contender, resolve_run
from benchmarks.quality.protocol import TaskFactory
from benchmarks.quality.runner import init_process, run_in_process

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR_GRID = tuple(float(f"{10 ** (e / 2):.3g}") for e in range(-10, -1))  # 1e-5, 3.16e-5, ..., 0.1
SHORT_TASKS = ("lora_teacher", "digits", "char_lm")
LONG_TASK = "tiny_sd_long"
GOOD = 0.9
CONTENDERS = (
    Contender("AdamW (fused)", "AdamW", 1e-3, {"fused": True}),
    Contender("AdaptiveHinaAdamW", "AdaptiveHinaAdamW", 1e-3),
    Contender("AdaptiveHinaAdamW, no hypergradient scale", "AdaptiveHinaAdamW", 1e-3, {"use_hypergrad": False}),
    Contender("HinaAdamWOptimizer", "HinaAdamWOptimizer", 1e-3),
    Contender("HinaAdamWOptimizer, no hypergradient scale", "HinaAdamWOptimizer", 1e-3, {"use_hypergrad": False}),
    Contender("Automagic_CameAMP", "Automagic_CameAMP", 1e-3),
    Contender("Automagic_CameAMP, with hypergradient scale", "Automagic_CameAMP", 1e-3, {"use_hypergrad": True}),
)
LONG_CONTENDERS = ("AdamW (fused)", "AdaptiveHinaAdamW", "AdaptiveHinaAdamW, no hypergradient scale")


def plan(quick: bool) -> list[tuple[str, object]]:
    factory = TaskFactory(False, {})
    items = []
    seeds = (1,) if quick else (1, 2, 3)
    for task in SHORT_TASKS + (() if quick else (LONG_TASK,)):
        steps = factory(task).steps
        long = task == LONG_TASK
        for c in CONTENDERS:
            if long and c.key not in LONG_CONTENDERS:
                continue
            for lr in (LR_GRID[::2] if long else LR_GRID):
                for seed in ((1,) if long else seeds):
                    items.append((json.dumps([task, c.key, lr, seed]), resolve_run(c, task, steps, lr, seed)))
    return items


def span(scores: dict) -> float | None:
    """max/min lr of the run of grid points scoring >= GOOD around the best one (None if none)."""
    lrs = sorted(scores)
    finite = {lr: s for lr, s in scores.items() if s is not None and math.isfinite(s)}
    if not finite or max(finite.values()) < GOOD:
        return None
    i = lrs.index(max(finite, key=finite.get))
    lo = hi = i
    while lo > 0 and (scores[lrs[lo - 1]] or -math.inf) >= GOOD:
        lo -= 1
    while hi < len(lrs) - 1 and (scores[lrs[hi + 1]] or -math.inf) >= GOOD:
        hi += 1
    return lrs[hi] / lrs[lo]


def summarise(runs: dict, ref: dict) -> dict:
    out = {}
    for key, r in runs.items():
        task, name, lr, _seed = json.loads(key)
        out.setdefault(task, {}).setdefault(name, {}).setdefault(lr, []).append(r["final"])
    table = {}
    for task, by_name in out.items():
        start, best = ref[task][:2]
        table[task] = {}
        for name, by_lr in by_name.items():
            scores = {}
            for lr, finals in by_lr.items():
                mean = statistics.fmean(finals) if all(math.isfinite(f) for f in finals) else math.inf
                scores[float(lr)] = (start - mean) / (start - best) if math.isfinite(mean) else -math.inf
            table[task][name] = {"scores": sorted(scores.items()), "span": span(scores)}
    return table


def render(results: dict) -> str:
    lines = ["## lr sensitivity: how far off the lr may be", "",
             f"`python -m benchmarks.bench_lr_sensitivity --jobs 2` ({results['wall_seconds'] / 60:.1f} min, "
             f"torch {results['machine']['torch']}, {results['machine']['cpu_count']} CPUs), raw data "
             "`benchmarks/results/lr_sensitivity.json`. Each optimizer at a fixed lr grid, otherwise exactly as the "
             "quality benchmark runs an untuned contender; cell = no-tune score (start − final) / (start − tuned AdamW "
             "final) of the mean final held-out loss (seeds " + ", ".join(str(s) for s in results["seeds"])
             + f"; {LONG_TASK}: seed 1), start and tuned AdamW from `quality.json`. *span*: max/min lr of the "
             f"contiguous grid points scoring ≥ {GOOD} around the best one (– where none does).", ""]
    for task, rows in results["table"].items():
        lrs = sorted({lr for r in rows.values() for lr, _ in r["scores"]})
        lines += [f"**{task}**", "", "| optimizer | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " | span |",
                  "|---|" + "---|" * (len(lrs) + 1)]
        for name, r in rows.items():
            cells, by_lr = [], dict(r["scores"])
            for lr in lrs:
                s = by_lr.get(lr)
                cells.append("" if s is None else ("div." if not math.isfinite(s) else
                                                   (f"**{s:.2f}**" if s >= GOOD else f"{s:.2f}")))
            sp = r["span"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if sp is None else f'{sp:.0f}×'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    ref = reference(False)
    if not all(t in ref for t in SHORT_TASKS + (LONG_TASK,)):
        raise SystemExit("benchmarks/results/quality.json lacks a task's start or tuned AdamW: run make bench-quality")
    items = plan(args.quick)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=init_process,
                             initargs=(TaskFactory(False, {}), 1)) as pool:
        runs = dict(pool.map(run_in_process, items, chunksize=1))
    results = {"wall_seconds": time.perf_counter() - t0, "seeds": [1] if args.quick else [1, 2, 3],
               "grid": list(LR_GRID), "machine": {"torch": torch.__version__, "cpu_count": os.cpu_count(),
                                                  "platform": platform.platform()},
               "runs": {k: {"final": v["final"], "diverged": v["diverged"]} for k, v in runs.items()},
               "table": summarise(runs, ref)}
    name = "lr_sensitivity_quick.json" if args.quick else "lr_sensitivity.json"
    with open(os.path.join(RESULTS, name), "w") as f:
        json.dump(results, f, indent=1)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
