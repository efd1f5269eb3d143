"""Training quality of every optimizer on four fully local LoRA fine-tuning tasks.

    python -m benchmarks.bench_quality [--quick] [--jobs 2] [--tasks ...] [--contenders ...]
    python -m benchmarks.bench_quality --rerender [--quick]     (no training)

Tasks (``benchmarks/quality/tasks.py``): LoRA-teacher, a digits MLP, a byte-level transformer
LM (each run ~0.5-1.6 s) and a 1500-step tiny-SD U-Net LoRA (``tiny_sd_long``, ~45-230 s a run),
each pretrained briefly (cached under ``.cache/bench_quality/``) and then LoRA-fine-tuned.

Protocol (``benchmarks/quality/protocol.py``): per task, every tuned contender gets an lr search
on the tuning seed (``search.py``: centre x {1/3, 1, 3}, extended in factor-3 steps while the
best point is at an edge, at most 8 points; the centre is the untuned lr, or a measured hint in
``search.GRID_CENTRE``) and runs at its best lr on the report seeds (1, 2, 3);
every untuned contender (ours at constructor defaults, every ``configs/*.toml`` preset) runs as
shipped on the report seeds; warmup/transition lengths longer than half the run are scaled
down (``contenders.scale_lengths``); identical runs are run once; AdaptiveHinaAdamW and
Automagic_CameAMP get leave-one-out and add-one-in ablations (``ablation.py``) at their tuned
lr on lora_teacher, digits and char_lm (``--ablate-long`` adds tiny_sd_long).

The full run is sized for 45 minutes on a 2-core CPU with ``--jobs 2``: tiny_sd_long runs only
``LONG_TASK_CONTENDERS`` (the report lists who was left out; ``--all-on-long`` runs everyone,
about 100 minutes); the time estimate of the cost model is printed at the start (``--estimate``
prints it and exits). ``--quick`` (under 5 minutes with --jobs 2): AdamW (fused), AdaptiveHinaAdamW,
HinaAdamWOptimizer, Automagic_CameAMP and Prodigy, 1 report seed, tiny_sd_long at 300 steps,
searches capped at 5 points, leave-one-out ablation of AdaptiveHinaAdamW on lora_teacher.

Writes ``benchmarks/results/quality.json`` (``quality_quick.json`` with ``--quick``), loss-curve
PNGs in ``docs/img/quality_<task>[_quick].png``, and prints the markdown section that
``benchmarks/run_all.py`` puts into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

from benchmarks.quality.ablation import LEAVE_ONE_OUT, MODES
from benchmarks.quality.protocol import (ABLATION_TASKS, FULL_RUN_MINUTES, REPORT_SEEDS, Ablation, ProtocolConfig,
                                         RunStore, TaskProtocol, estimate, execute)
from benchmarks.quality.search import SearchRule
from benchmarks.quality.tasks import TASK_ORDER, TASK_SPECS

ABLATED = ("AdaptiveHinaAdamW", "Automagic_CameAMP")
# The full run fits FULL_RUN_MINUTES on a 2-core CPU with --jobs 2 only if tiny_sd_long (a run:
# 45-230 s) runs a subset: AdamW (fused), CAME and Prodigy as references, our three main classes
# tuned and untuned, and the SD-LoRA presets of their families. Every other contender (the other
# peers, the 8-bit / C-Optim / refactored variants, the other presets, new presets) is left out
# of that task and listed in the report; --all-on-long runs everything there (about 100
# minutes). The 8-bit forms are compared with their 32-bit twins on the three small tasks (on
# tiny_sd_long in the run of 2026-12-07 at 27cfdbb, AdaptiveHinaAdamW optim_bits=8 ended at
# 0.3373 +- 0.0012 against 0.3376 +- 0.0005 at 32 bits).
LONG_TASK = "tiny_sd_long"
LONG_TASK_CONTENDERS = (
    "AdamW (fused)", "CAME (pytorch_optimizer)", "Prodigy (prodigyopt)", "AdaptiveHinaAdamW",
    "HinaAdamWOptimizer", "Automagic_CameAMP",
    "preset adaptive_hina_sd_lora", "preset adaptive_hina_general", "preset demo", "preset hina_adamw_sd_lora",
    "preset automagic_cameamp",
)
QUICK_MAX_POINTS = 5


def full_run_left_out(keys, all_on_long: bool = False, chosen_by_user: bool = False) -> dict:
    """{task: contenders left out of it} of the full run (see LONG_TASK_CONTENDERS); nothing is
    left out of contenders the user named."""
    if all_on_long or chosen_by_user:
        return {}
    return {LONG_TASK: tuple(k for k in keys if k not in LONG_TASK_CONTENDERS)}


def protocol_config(quick: bool = False, tasks=None, seeds=None, jobs: int = 2, threads: int = 1,
                    overrides=None, ablate_long: bool = False, max_points: int | None = None,
                    ablations=None, left_out=None) -> ProtocolConfig:
    """The full or --quick protocol, with the CLI's changes."""
    if ablations is None:
        ablation_tasks = ABLATION_TASKS + (("tiny_sd_long",) if ablate_long else ())
        ablations = ((Ablation("AdaptiveHinaAdamW", (LEAVE_ONE_OUT,), ("lora_teacher",)),) if quick else
                     tuple(Ablation(key, MODES, ablation_tasks) for key in ABLATED))
    return ProtocolConfig(
        quick=quick, tasks=tuple(tasks or TASK_ORDER), report_seeds=tuple(seeds or ((1,) if quick else REPORT_SEEDS)),
        rule=SearchRule(max_points=max_points or (QUICK_MAX_POINTS if quick else SearchRule().max_points)),
        ablations=tuple(ablations), left_out={} if quick else dict(left_out or {}),
        task_overrides=overrides or {}, jobs=jobs, threads=threads)


def select_contenders(quick: bool, keys=None, log=print) -> tuple[list, dict]:
    """(contenders whose packages are installed, {key: why skipped}); `keys` picks by label, or
    is a list of Contender objects to use as they are."""
    from benchmarks.quality.contenders import Contender, contenders

    pool = contenders()
    if keys and all(isinstance(k, Contender) for k in keys):
        pool, keys = list(keys), [k.key for k in keys]
    chosen, skipped = [], {}
    for c in pool:
        if (keys is not None and c.key not in keys) or (keys is None and quick and not c.quick):
            continue
        try:
            c.optimizer_class()
            chosen.append(c)
        except ValueError as e:  # its package is not installed (pip install -r requirements-bench.txt)
            skipped[c.key] = str(e)
            log(f"skip {c.key}: {e}")
    if keys is not None:
        unknown = set(keys) - {c.key for c in chosen} - set(skipped)
        if unknown:
            raise SystemExit(f"unknown contenders: {', '.join(sorted(unknown))}")
    return chosen, skipped


def _available_tasks(tasks, log) -> tuple[list, dict]:
    ok, skipped = [], {}
    for t in tasks:
        need = TASK_SPECS[t].requires
        if need and importlib.util.find_spec(need) is None:
            skipped[t] = f"needs {need} (pip install -r requirements-bench.txt)"
            log(f"skip task {t}: {skipped[t]}")
        else:
            ok.append(t)
    return ok, skipped


def _log_estimate(est: dict, config: ProtocolConfig, log) -> None:
    per = ", ".join(f"{t} {s / 60:.1f}" for t, s in est["cpu_seconds"].items())
    log(f"estimated time: {est['wall_seconds'] / 60:.1f} min wall on {config.jobs} process(es) "
        f"({est['total_cpu_seconds'] / 60:.1f} CPU-min: {per}; searches assumed {est['search_points_assumed']} points)")
    if not config.quick and est["wall_seconds"] > 60 * FULL_RUN_MINUTES:
        log(f"warning: the estimate exceeds {FULL_RUN_MINUTES} minutes")


def run(quick: bool = False, tasks=None, contenders=None, seeds=None, overrides=None, jobs: int = 2,
        threads: int = 1, ablate_long: bool = False, max_points: int | None = None, ablations=None,
        all_on_long: bool = False, log=None) -> dict:
    """Run the benchmark; returns the results dict (written nowhere). `ablations=()` runs none."""
    log = log or (lambda msg: print(msg, flush=True))
    tasks, tasks_skipped = _available_tasks(list(tasks or TASK_ORDER), log)
    chosen, skipped = select_contenders(quick, contenders, log)
    config = protocol_config(quick, tasks, seeds, jobs, threads, overrides, ablate_long, max_points, ablations,
                             full_run_left_out([c.key for c in chosen], all_on_long, contenders is not None))
    est = estimate(config, chosen)
    _log_estimate(est, config, log)
    t0 = time.perf_counter()
    factory = config.task_factory()
    local = {t: factory(t) for t in tasks}
    for t, obj in local.items():  # pretraining (if not cached) happens once, here
        obj.setup(log)
    store = RunStore(log)
    protocols = {t: TaskProtocol(t, chosen, config, store) for t in tasks}
    for p in protocols.values():
        p.start()
    execute(store, jobs, factory, threads, local)
    results = {"mode": "quick" if quick else "full", "config": {**config.describe(), "estimate": est},
               "contenders_skipped": skipped, "tasks_skipped": tasks_skipped,
               "tasks": {t: p.results(local[t]) for t, p in protocols.items()},
               "wall_seconds": time.perf_counter() - t0}
    from benchmarks.common import machine
    from benchmarks.quality.summary import summarise

    results["machine"] = {**machine(), "threads": threads, "jobs": jobs}
    results["git"] = _git_state()
    return summarise(results)


def results_path(quick: bool, name: str | None = None) -> str:
    from benchmarks.common import RESULTS_DIR

    return os.path.join(RESULTS_DIR, name or ("quality_quick.json" if quick else "quality.json"))


def rerender(quick: bool = False, plots: bool = True, path: str | None = None, img_dir: str | None = None) -> dict:
    """Recompute the summaries and plots from a saved results file (no training) and save it."""
    from benchmarks.quality.report import plot_all
    from benchmarks.quality.summary import summarise

    path = path or results_path(quick)
    with open(path, encoding="utf-8") as f:
        results = summarise(json.load(f))
    if plots:
        plot_all(results, **({"img_dir": img_dir} if img_dir else {}))
    _write(path, results)
    return results


def _write(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the --quick protocol (see above)")
    ap.add_argument("--tasks", nargs="*", choices=TASK_ORDER, help="tasks to run (default: all four)")
    ap.add_argument("--contenders", nargs="*", metavar="LABEL",
                    help='contender labels, e.g. "AdamW (fused)" "preset demo" (default: all, or the --quick set)')
    ap.add_argument("--seeds", nargs="*", type=int, help="report seeds (default 1 2 3; --quick: 1)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--max-points", type=int, help="cap of an lr search (default 8; --quick: 5)")
    ap.add_argument("--steps", nargs="*", metavar="TASK=N", default=[],
                    help="override a task's length, e.g. lora_teacher=50 (changes the results' meaning)")
    ap.add_argument("--ablate-long", action="store_true", help="also run the ablations on tiny_sd_long")
    ap.add_argument("--no-ablations", action="store_true", help="run no ablation")
    ap.add_argument("--all-on-long", action="store_true",
                    help="run every contender on tiny_sd_long (the full run then takes about 100 minutes on 2 cores; see --estimate)")
    ap.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--img-dir", help="where the plots go (default docs/img)")
    ap.add_argument("--out", help="results file name in benchmarks/results (default quality[_quick].json)")
    ap.add_argument("--rerender", action="store_true",
                    help="no training: recompute summaries and plots from the saved results file")
    return ap


def _step_overrides(items) -> dict:
    out = {}
    for item in items:
        task, _, n = item.partition("=")
        if task not in TASK_SPECS or not n.isdigit():
            raise SystemExit(f"--steps {item!r}: expected TASK=N with TASK one of {', '.join(TASK_ORDER)}")
        out[task] = {"steps": int(n)}
    return out


def main(argv=None):
    args = _parser().parse_args(argv)
    from benchmarks.quality.report import plot_all, render_markdown

    if args.rerender:
        print(render_markdown(rerender(args.quick, plots=not args.no_plots,
                                       path=results_path(args.quick, args.out), img_dir=args.img_dir)))
        return None
    torch.set_num_threads(args.threads)
    ablations = () if args.no_ablations else None
    if args.estimate:
        chosen, _ = select_contenders(args.quick, args.contenders)
        config = protocol_config(args.quick, args.tasks, args.seeds, args.jobs, args.threads,
                                 _step_overrides(args.steps), args.ablate_long, args.max_points, ablations,
                                 full_run_left_out([c.key for c in chosen], args.all_on_long,
                                                   args.contenders is not None))
        _log_estimate(estimate(config, chosen), config, print)
        return None
    results = run(quick=args.quick, tasks=args.tasks, contenders=args.contenders, seeds=args.seeds,
                  overrides=_step_overrides(args.steps), jobs=args.jobs, threads=args.threads,
                  ablate_long=args.ablate_long, max_points=args.max_points, ablations=ablations,
                  all_on_long=args.all_on_long)
    if not args.no_plots:
        plot_all(results, **({"img_dir": args.img_dir} if args.img_dir else {}))
    path = results_path(args.quick, args.out)
    _write(path, results)
    print(render_markdown(results))
    print(f"wrote {path} in {results['wall_seconds'] / 60:.1f} min", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
