"""Probe one optimizer configuration on the quality benchmark's tasks, without the full protocol.

    python -m benchmarks.probe_quality AdaptiveHinaAdamW --lr 1e-3 --set lr_mask_ceiling=100 \
        [--versus | --versus-set KEY=VALUE ...] [--tasks lora_teacher digits] [--seeds 1 2 3] [--jobs 2] [--quick]

Runs the configuration exactly as ``bench_quality`` runs an untuned contender (same tasks, seeds,
cosine schedule with 5% warmup, warmup/transition lengths scaled to the run) and prints, per
task, the final held-out loss (mean ± sample std over the seeds) and the no-tune score against
the start loss and tuned AdamW of ``benchmarks/results/quality.json`` (``quality_quick.json``
with ``--quick``), and the paired comparison with tuned AdamW's runs of the same seeds (Δ% and t
as in the report, ◆ where the paired t-test separates them: ``quality/summary.py``). With
``--versus`` it also runs the optimizer's defaults (``--versus-set``: other arguments) at the same
lr on the same seeds and compares the two seed by seed: the direct test of one change
(``--versus-type``: another optimizer, e.g. an 8-bit form's 32-bit twin). A development tool for choosing defaults: a default changes only after the
full ``make bench-quality`` run confirms it.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from benchmarks.quality.contenders import BASELINE, Contender, resolve_run
from benchmarks.quality.protocol import TaskFactory
from benchmarks.quality.runner import init_process, run_in_process
from benchmarks.quality.summary import paired
from benchmarks.quality.tasks import TASK_ORDER
from library.optimizers.registry import parse_optimizer_args
from library.train_util import resolve_optimizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def reference(quick: bool) -> dict:
    """{task: (start loss, tuned AdamW loss, steps, tuned AdamW's runs)} from the last full (or
    quick) run; the runs (one per report seed) are what :func:`paired` compares against."""
    path = os.path.join(RESULTS, "quality_quick.json" if quick else "quality.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    out = {}
    for name, task in data.get("tasks", {}).items():
        summary = task.get("summary", {})
        if summary.get("start_loss") is not None and summary.get("reference_final") is not None:
            ids = task.get("contenders", {}).get(BASELINE, {}).get("tuned_runs", [])
            runs = [task["runs"][i] for i in ids if i in task.get("runs", {})]
            out[name] = (summary["start_loss"], summary["reference_final"], task.get("steps"), runs)
    return out


def configuration_error(optimizer_type: str, lr: float, kwargs: dict) -> str | None:
    """The one-line reason the optimizer refuses these arguments (built on one small tensor
    before any task is set up), or None."""
    try:
        cls, resolved, _info = resolve_optimizer(optimizer_type, dict(kwargs))
        cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr, **resolved)
    except (ValueError, TypeError) as e:
        return f"{optimizer_type} {kwargs}: {e}"
    return None


def score(start: float, loss: float, best: float) -> float:
    return (start - loss) / (start - best)


def _format_paired(vs: dict) -> str:
    n = len(vs["log_ratios"])
    return f"{vs['delta_pct']:+.1f}% t {vs['t']:+.1f}{' ◆' if vs['clear'] else ''} ({n} seeds in common)"


def _task_line(task: str, runs: list[dict], ref: dict) -> str:
    """One task's result: mean ± std of the finals, the no-tune score and the paired comparison
    with tuned AdamW where the last full run has them."""
    finals = [r["final"] for r in runs]
    errors = {r.get("error") for r in runs} - {None}
    if errors:
        return f"  {task:14s} failed: {'; '.join(sorted(errors))}"
    if not all(math.isfinite(f) for f in finals):
        return f"  {task:14s} diverged on {sum(not math.isfinite(f) for f in finals)} of {len(finals)} seeds"
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    line = f"  {task:14s} {mean:.6g} ± {std:.2g}"
    if task in ref:
        start, best, _, adamw_runs = ref[task]
        line += f"   no-tune {score(start, mean, best):.3f}  (start {start:.4g}, tuned AdamW {best:.4g})"
        vs = paired(runs, adamw_runs)
        if vs["t"] is not None:
            line += f"   vs tuned AdamW, paired: {_format_paired(vs)}"
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimizer_type")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an optimizer argument, as --optimizer_args reads it (repeatable)")
    ap.add_argument("--versus", action="store_true",
                    help="also run the optimizer with its defaults (or the --versus-set arguments) at the same lr "
                         "on the same seeds, and compare the two seed by seed")
    ap.add_argument("--versus-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an argument of the comparison run (repeatable; implies --versus)")
    ap.add_argument("--versus-type", metavar="OPTIMIZER_TYPE",
                    help="the comparison run's optimizer (default: the same; implies --versus), e.g. an 8-bit "
                         "form against its 32-bit twin")
    ap.add_argument("--tasks", nargs="*", choices=TASK_ORDER, default=list(TASK_ORDER))
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the --quick task sizes")
    args = ap.parse_args(argv)

    configs = {"probe": (args.optimizer_type, parse_optimizer_args(args.set) if args.set else {})}
    if args.versus or args.versus_set or args.versus_type:
        configs["versus"] = (args.versus_type or args.optimizer_type,
                             parse_optimizer_args(args.versus_set) if args.versus_set else {})
    for optimizer_type, kwargs in configs.values():
        problem = configuration_error(optimizer_type, args.lr, kwargs)
        if problem:
            print(f"probe_quality: {problem}", file=sys.stderr)
            return 2
    factory = TaskFactory(args.quick, {})
    ref = reference(args.quick)
    items = []
    for label, (optimizer_type, kwargs) in configs.items():
        contender = Contender(label, optimizer_type, args.lr, kwargs, "probe")
        for task in args.tasks:
            steps = factory(task).steps
            items += [((label, task, seed), resolve_run(contender, task, steps, args.lr, seed)) for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=init_process,
                             initargs=(factory, 1)) as pool:
        results = dict(pool.map(run_in_process, items))
    runs = lambda label, task: [results[(label, task, s)] for s in args.seeds]  # noqa: E731
    for label, (optimizer_type, kwargs) in configs.items():
        print(f"{optimizer_type} lr={args.lr} {kwargs}" + (" (the comparison run)" if label == "versus" else ""))
        for task in args.tasks:
            print(_task_line(task, runs(label, task), ref), flush=True)
    if "versus" in configs:
        print(f"{' '.join(map(str, configs['probe']))} against {' '.join(map(str, configs['versus']))}, seed by seed:")
        for task in args.tasks:
            vs = paired(runs("probe", task), runs("versus", task))
            print(f"  {task:14s} " + (_format_paired(vs) if vs["t"] is not None else "no comparison"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
