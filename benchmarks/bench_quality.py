"""Training quality of every optimizer on four fully local LoRA fine-tuning tasks.

    python -m benchmarks.bench_quality [--quick] [--tasks lora_teacher digits ...]
                                       [--contenders "AdamW (fused)" AdaptiveHinaAdamW ...] [--jobs 1]

Tasks (``benchmarks/quality/tasks.py``): LoRA-teacher, tiny-SD U-Net LoRA on a held-out style,
a digits MLP and a byte-level transformer LM, each pretrained briefly (cached under
``.cache/bench_quality/``) and then LoRA-fine-tuned. Every optimizer gets the same lr grid
around its documented lr on a tuning seed and is reported over 3 other seeds
(``benchmarks/quality/runner.py`` has the protocol and the metric definitions).

Writes ``benchmarks/results/quality.json`` (``quality_quick.json`` with ``--quick``), loss-curve
PNGs in ``docs/img/quality_<task>[_quick].png``, and prints the markdown section that
``benchmarks/run_all.py`` puts into docs/benchmarks.md.

``--quick`` (at most 5 minutes): 5 optimizers, a 2-point grid, 1 report seed, shorter runs.
The full run (at most 30 minutes on a 2-core CPU, one thread): 14 optimizers, a 4-point grid,
3 report seeds, and our optimizers' documented lr on the report seeds too where the grid chose
another lr.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

TASK_ORDER = ("lora_teacher", "digits", "char_lm", "tiny_diffusion")
QUICK_GRID = (1.0, 3.0)


def _grid_fn(quick: bool):
    if not quick:
        return None

    from benchmarks.quality.contenders import PRODIGY_GRID

    def grid(c):
        if c.grid == PRODIGY_GRID:  # Prodigy-style: lr=1 only
            return [c.lr]
        return [float(f"{c.lr * g:.3g}") for g in QUICK_GRID]

    return grid


def _effective(entry: dict) -> dict:
    """The contender's keyword arguments with the class defaults filled in."""
    import inspect

    from library.train_util import resolve_optimizer

    try:
        cls, kw, _ = resolve_optimizer(entry["optimizer_type"], dict(entry["base_kwargs"]))
    except ValueError:
        return dict(entry["base_kwargs"])
    out = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}
    out.update(kw)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _notes(results: dict) -> list[str]:
    """Facts worth a line under the tables, derived from the results (grouped over tasks)."""
    same, bnb32, state = {}, [], {}
    for tname, task in results["tasks"].items():
        cs = task["contenders"]
        keys = list(cs)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                ea, eb = cs[a], cs[b]
                ra, rb = ea["runs"], eb["runs"]
                if (ea["best_lr"] == eb["best_lr"] and len(ra) == len(rb)
                        and all(math.isfinite(x["final"]) and x["final"] == y["final"] for x, y in zip(ra, rb))):
                    same.setdefault((a, b), []).append((tname, ea["summary"]["step_ms"], eb["summary"]["step_ms"]))
        bnb = cs.get("bnb AdamW8bit")
        if bnb and bnb["summary"]["state_bytes_per_param"] >= 7.9:
            bnb32.append(tname)
        for key, e in cs.items():
            if "default_summary" in e:
                a, b = e["default_summary"]["state_bytes_per_param"], e["summary"]["state_bytes_per_param"]
                if abs(a - b) > 0.5:
                    changed = {k: v for k, v in e["runs"][0]["kwargs"].items() if e["base_kwargs"].get(k) != v}
                    state.setdefault(key, []).append((tname, a, b, e["best_lr"], changed))
    notes = []
    for (a, b), where in same.items():
        ea = next(t["contenders"][a] for t in results["tasks"].values() if a in t["contenders"])
        eb = next(t["contenders"][b] for t in results["tasks"].values() if b in t["contenders"])
        if ea["optimizer_type"] == eb["optimizer_type"]:
            fa, fb = _effective(ea), _effective(eb)
            diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
            why = "their arguments differ only in " + ", ".join(f"`{k}` ({fa.get(k)} / {fb.get(k)})" for k in diff)
        else:
            why = f"`{ea['optimizer_type']}` and `{eb['optimizer_type']}` made the same updates"
        times = "; ".join(f"{t}: {x:.3g} / {y:.3g} ms" for t, x, y in where)
        tail = (f" Their step times ({times}) show the timing noise of the shared machine."
                if ea["optimizer_type"] == eb["optimizer_type"] else "")
        notes.append(f"{a} and {b} gave bit-identical held-out losses on every seed in {', '.join(t for t, _, _ in where)} "
                     f"({why}).{tail}")
    if bnb32:
        notes.append(f"bnb AdamW8bit kept 32-bit state (8 B/param) in {', '.join(bnb32)}: bitsandbytes quantises only "
                     "tensors with at least `min_8bit_size` (4096) elements, and no LoRA tensor here is that large, so "
                     "it ran as 32-bit AdamW.")
    for key, rows in state.items():
        cells = "; ".join(f"{t}: {a:.3g} at the documented lr, {b:.3g} at lr {lr:.3g} with {changed}"
                          for t, a, b, lr, changed in rows)
        notes.append(f"{key}: optimizer state per parameter depends on the lr setting ({cells}).")
    if any(t["setup"].get("pretrain_cached") for t in results["tasks"].values() if isinstance(t.get("setup"), dict)):
        notes.append("Pretrained weights came from `.cache/bench_quality/` (trained by an earlier run with the same "
                     "settings); the wall time excludes that pretraining.")
    return notes


def rerender(quick: bool = False, plots: bool = True) -> dict:
    """Recompute summaries, notes and plots from a saved results file (no training)."""
    import json

    from benchmarks.common import RESULTS_DIR
    from benchmarks.quality.report import plot_all
    from benchmarks.quality.runner import summarise

    path = os.path.join(RESULTS_DIR, "quality_quick.json" if quick else "quality.json")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    for task in results["tasks"].values():
        summarise(task)
    results["notes"] = _notes(results) + [n for n in results.get("notes", []) if "skipped" in n]
    if plots:
        plot_all(results)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    return results


def _git_state() -> dict:
    """HEAD and the uncommitted files that can change the numbers (library/, networks/, benchmarks/)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "library", "networks", "benchmarks"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "uncommitted": [line[3:] for line in dirty if not line[3:].startswith("benchmarks/results")]}


def _task_worker(payload):
    name, quick, keys, seeds, default_runs, overrides, threads = payload
    torch.set_num_threads(threads)
    from benchmarks.quality.contenders import contenders
    from benchmarks.quality.runner import run_task
    from benchmarks.quality.tasks import make_task

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    skipped = {}
    cs = []
    for c in contenders():
        if not ((keys is None and (c.quick or not quick)) or (keys is not None and c.key in keys)):
            continue
        try:
            c.resolve()
            cs.append(c)
        except ValueError as e:  # its package is not installed (pip install -r requirements-bench.txt)
            skipped[c.key] = str(e)
            log(f"  skip {c.key}: {e}")
    task = make_task(name, quick=quick, **(overrides or {}))
    t0 = time.perf_counter()
    out = run_task(task, cs, seeds=seeds, grid_override=_grid_fn(quick), default_on_report_seeds=default_runs, log=log)
    out["seconds"] = time.perf_counter() - t0
    out["skipped_contenders"] = skipped
    log(f"== {name}: {out['seconds']:.0f}s, winner {out['winner']}")
    return name, out


def run(quick: bool = False, tasks=None, contenders=None, seeds=None, default_runs=None, overrides=None,
        jobs: int = 1, threads: int = 1) -> dict:
    """Run the benchmark; returns the results dict (not written anywhere)."""
    from benchmarks.quality.runner import REPORT_SEEDS, TUNING_SEED

    import importlib.util

    from benchmarks.quality.tasks import REQUIRES

    tasks = list(tasks or TASK_ORDER)
    missing = [t for t in tasks if t in REQUIRES and importlib.util.find_spec(REQUIRES[t]) is None]
    for t in missing:
        print(f"skip task {t}: needs {REQUIRES[t]} (pip install -r requirements-bench.txt)", file=sys.stderr)
    tasks = [t for t in tasks if t not in missing]
    seeds = tuple(seeds or ((1,) if quick else REPORT_SEEDS))
    default_runs = (not quick) if default_runs is None else default_runs
    payloads = [(t, quick, contenders, seeds, default_runs, (overrides or {}).get(t), threads) for t in tasks]
    t0 = time.perf_counter()
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp

        heavy_first = sorted(payloads, key=lambda p: -TASK_ORDER.index(p[0]) if p[0] in TASK_ORDER else 0)
        with mp.get_context("spawn").Pool(jobs) as pool:
            done = dict(pool.imap_unordered(_task_worker, heavy_first))
    else:
        done = dict(_task_worker(p) for p in payloads)
    results = {
        "mode": "quick" if quick else "full",
        "config": {"tuning_seed": TUNING_SEED, "report_seeds": list(seeds), "jobs": jobs, "threads": threads,
                   "grid_desc": ("x{1, 3} of the documented lr (Prodigy-style: lr=1 only)" if quick else
                                 "x{1/3, 1, 3, 10} of the documented lr (Prodigy-style: lr 0.5 and 1)"),
                   "default_runs_on_report_seeds": default_runs},
        "tasks": {t: done[t] for t in tasks},
        "wall_seconds": time.perf_counter() - t0,
    }
    from benchmarks.common import machine

    results["machine"] = machine()
    results["git"] = _git_state()
    results["notes"] = _notes(results) + [f"task {t} skipped: {REQUIRES[t]} is not installed" for t in missing]
    for t, task in results["tasks"].items():
        for k, why in task.get("skipped_contenders", {}).items():
            results["notes"].append(f"{t}: {k} skipped ({why})")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", nargs="*", choices=TASK_ORDER)
    ap.add_argument("--contenders", nargs="*", help="contender labels (default: all, or the --quick set)")
    ap.add_argument("--seeds", nargs="*", type=int, help="report seeds (default 1 2 3; --quick: 1)")
    ap.add_argument("--jobs", type=int, default=1, help="tasks run in parallel processes (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", help="results file name in benchmarks/results (default quality[_quick].json)")
    ap.add_argument("--rerender", action="store_true",
                    help="no training: recompute summaries, notes and plots from the saved results file")
    args = ap.parse_args(argv)
    if args.rerender:
        from benchmarks.quality.report import render_markdown

        print(render_markdown(rerender(args.quick, plots=not args.no_plots)))
        return None
    torch.set_num_threads(args.threads)
    from benchmarks.common import write_json
    from benchmarks.quality.report import plot_all, render_markdown

    results = run(quick=args.quick, tasks=args.tasks, contenders=args.contenders, seeds=args.seeds,
                  jobs=args.jobs, threads=args.threads)
    if not args.no_plots:
        plot_all(results)
    path = write_json(args.out or ("quality_quick.json" if args.quick else "quality.json"), results)
    print(render_markdown(results))
    print(f"wrote {path} in {results['wall_seconds'] / 60:.1f} min", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
