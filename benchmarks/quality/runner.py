"""Training loop, lr grid, seeds and metrics of the quality benchmark.

Protocol, per (task, contender):

1. lr grid on the tuning seed (seed 0): one run per grid lr; the best final held-out loss wins
   (a run whose loss becomes non-finite counts as +inf).
2. Report runs at the chosen lr on the report seeds (1, 2, 3 by default): mean and spread.
3. For our optimizers whose documented lr lost the grid, the documented lr is also run on the
   report seeds (``default_runs``), so "default vs best" is compared on the same seeds.

Metrics:

- final held-out loss (mean, sample std, min, max over the report seeds);
- steps to reach AdamW (fused)'s final held-out loss: the first evaluation step at which the
  contender's mean held-out curve is at or below AdamW's mean final loss ("never" if none);
  evaluations are evenly spaced, so this has the resolution of the evaluation interval;
- stability: std / mean of the training loss over the last 20% of steps (mean over seeds);
- step time: median wall time of ``optimizer.step()`` over the steps of a run, the lowest of
  those medians over the report seeds (on a shared machine other processes only add time),
  and its ratio to AdamW (fused) measured the same way in the same process;
- optimizer state bytes per trainable parameter at the end (``benchmarks.common.state_bytes``);
- peak memory: the process's peak resident set size during the run minus its resident size
  just before the optimizer was built, read from ``/proc/self/status`` (VmHWM, reset through
  ``/proc/self/clear_refs`` after ``gc.collect()`` + ``malloc_trim(0)``); falls back to
  ``resource.getrusage`` (not resettable) elsewhere. It counts optimizer state, gradients,
  activations and allocator effects, so differences below ~1 MB are noise; the 8-bit classes'
  one-time 16 MiB random table shows up in the first run that creates it.

Learning-rate schedule: diffusers' cosine with 5% linear warmup (as the configs/ presets) for
every contender except AdamWScheduleFree, which runs at a constant lr with its own
``warmup_steps`` = 5% of the steps and is evaluated in ``optimizer.eval()`` mode.
"""
from __future__ import annotations

import ctypes
import gc
import math
import resource
import statistics
import time

import torch

from benchmarks.common import state_bytes

TUNING_SEED = 0
REPORT_SEEDS = (1, 2, 3)
BASELINE = "AdamW (fused)"


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC = None


def reset_peak() -> tuple[float | None, str]:
    """Reset the peak-RSS counter; returns (current RSS in KiB, method)."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS"), "VmHWM"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def peak_kb(method: str):
    return _status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ----------------------------------------------------------------------------- one run
def _scheduler(contender, opt, steps: int):
    if contender.schedule == "constant":
        return None
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", opt, num_warmup_steps=max(1, round(0.05 * steps)), num_training_steps=steps)


def eval_steps(steps: int, evals: int) -> list[int]:
    return sorted({round(steps * i / evals) for i in range(evals + 1)})


def train_one(task, contender, lr: float, seed: int, steps: int | None = None, evals: int | None = None) -> dict:
    steps = steps or task.steps
    evals = evals or task.evals
    points = eval_steps(steps, evals)
    t_start = time.perf_counter()
    run = task.new_run(seed)
    try:
        rss0, method = reset_peak()
        opt, kwargs = contender.build(run.groups, run.named, lr, steps)
        sched = _scheduler(contender, opt, steps)
        if callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None)):
            run._eval_mode, run._train_mode = opt.eval, opt.train  # schedule-free: evaluate the averaged x
        n_params = sum(p.numel() for _, p in run.named)
        losses, step_ms, curve = [], [], []
        diverged = False
        if 0 in points:
            curve.append(run.evaluate())
        for step in range(steps):
            loss = run.loss(step)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_ms.append(1e3 * (time.perf_counter() - t0))
            if hasattr(opt, "report_loss"):
                opt.report_loss(loss.detach())  # as train_network.py: C-Optim's loss context
            if sched is not None:
                sched.step()
            losses.append(lv)
            if step + 1 in points:
                curve.append(run.evaluate())
                if not math.isfinite(curve[-1]):
                    diverged = True
                    break
        peak = peak_kb(method)
        sb = state_bytes(opt)
        extra = {}
        if hasattr(run, "accuracy") and not diverged:
            with torch.no_grad():
                extra["accuracy"] = run.accuracy()
        del opt, sched
    finally:
        run.close()
    final = curve[-1] if curve and not diverged else float("inf")
    tail = losses[int(0.8 * len(losses)):] if losses else []
    stab = (statistics.pstdev(tail) / statistics.fmean(tail)) if len(tail) > 1 and statistics.fmean(tail) > 0 else None
    return {
        "seed": seed, "lr": lr, "kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
        "final": final, "diverged": diverged, "eval_steps": points[:len(curve)], "curve": curve,
        "train_loss": _buckets(losses, min(50, max(1, len(losses) // 4))), "train_loss_tail_mean": statistics.fmean(tail) if tail else None,
        "stability": stab, "step_ms_median": statistics.median(step_ms) if step_ms else None,
        "step_ms": step_ms, "state_bytes": sb, "n_params": n_params,
        "state_bytes_per_param": sb / max(1, n_params),
        "peak_rss_mb": None if peak is None or rss0 is None else (peak - rss0) / 1024.0, "peak_method": method,
        "seconds": time.perf_counter() - t_start, **extra,
    }


def warm_up(task, contender, lr, seed, steps: int = 2) -> None:
    """A throwaway two-step run: library loading, lazily built tables (the 8-bit classes' random
    table) and first-call allocations stay out of the measured runs."""
    run = task.new_run(seed)
    try:
        opt, _ = contender.build(run.groups, run.named, lr, 100)
        for step in range(steps):
            loss = run.loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        run.evaluate()
        del opt
    finally:
        run.close()


def _buckets(xs, n):
    """Means of `n` equal slices of xs (a compact training curve): [(end_step, mean)]."""
    if not xs:
        return []
    out = []
    for i in range(n):
        a, b = len(xs) * i // n, len(xs) * (i + 1) // n
        if b > a:
            out.append([b, statistics.fmean(xs[a:b])])
    return out


# ----------------------------------------------------------------------------- a task
def _fmt(x):
    return "inf" if x == float("inf") else f"{x:.4g}"


def run_task(task, contenders, seeds=REPORT_SEEDS, tuning_seed=TUNING_SEED, grid_override=None,
             default_on_report_seeds=True, log=print) -> dict:
    setup = task.setup(log)
    out = {"title": task.title, "describe": task.describe(), "setup": setup, "steps": task.steps,
           "eval_steps": eval_steps(task.steps, task.evals), "contenders": {}}
    for c in contenders:
        t0 = time.perf_counter()
        lrs = grid_override(c) if grid_override else c.lrs()
        warm_up(task, c, lrs[0], tuning_seed)
        grid = {}
        for lr in lrs:
            r = train_one(task, c, lr, tuning_seed)
            grid[repr(lr)] = {"lr": lr, "final": r["final"], "diverged": r["diverged"], "kwargs": r["kwargs"],
                              "seconds": r["seconds"]}
        best = min(grid.values(), key=lambda g: (g["final"], abs(math.log(g["lr"] / c.lr))))
        best_lr = best["lr"]
        runs = [train_one(task, c, best_lr, s) for s in seeds]
        entry = {"optimizer_type": c.optimizer_type, "source": c.source, "ours": c.ours, "default_lr": c.lr,
                 "base_kwargs": c.kwargs, "schedule": c.schedule, "grid": grid, "best_lr": best_lr,
                 "best_at_grid_edge": len(lrs) > 2 and best_lr in (min(lrs), max(lrs)),
                 "default_in_grid": any(math.isclose(lr, c.lr) for lr in lrs), "runs": runs}
        if (default_on_report_seeds and c.ours and entry["default_in_grid"] and not math.isclose(best_lr, c.lr)):
            entry["default_runs"] = [train_one(task, c, c.lr, s) for s in seeds]
        entry["seconds"] = time.perf_counter() - t0
        out["contenders"][c.key] = entry
        log(f"  {task.name:14s} {c.key:36s} grid " + " ".join(f"{g['lr']:.3g}:{_fmt(g['final'])}" for g in grid.values())
            + f" -> lr {best_lr:.3g}: " + " ".join(_fmt(r["final"]) for r in runs) + f"  ({entry['seconds']:.0f}s)")
    summarise(out)
    for entry in out["contenders"].values():  # the per-step times are summarised; keep the JSON small
        for r in entry["runs"] + entry.get("default_runs", []):
            r.pop("step_ms", None)
    return out


# ----------------------------------------------------------------------------- metrics
def _mean_curve(runs):
    n = min(len(r["curve"]) for r in runs)
    if any(r["diverged"] for r in runs):
        return []
    return [statistics.fmean(r["curve"][i] for r in runs) for i in range(n)]


def _summary(runs, base_final, base_ms, steps_axis):
    finals = [r["final"] for r in runs]
    ok = [f for f in finals if math.isfinite(f)]
    curve = _mean_curve(runs)
    reach = None
    if base_final is not None and curve:
        for s, v in zip(steps_axis, curve):
            if v <= base_final:
                reach = s
                break
    medians = [r["step_ms_median"] for r in runs if r.get("step_ms_median") is not None]
    ms = min(medians) if medians else None  # the least disturbed run: other processes only add time
    stabs = [r["stability"] for r in runs if r["stability"] is not None]
    peaks = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
    s = {
        "final_mean": statistics.fmean(finals) if len(ok) == len(finals) else float("inf"),
        "final_std": statistics.stdev(ok) if len(ok) > 1 else 0.0,
        "final_min": min(finals), "final_max": max(finals), "diverged_runs": sum(r["diverged"] for r in runs),
        "n_runs": len(runs),
        "mean_curve": curve, "steps_to_adamw_final": reach,
        "stability": statistics.fmean(stabs) if stabs else None,
        "step_ms": ms, "x_adamw_fused": (ms / base_ms) if ms and base_ms else None,
        "state_bytes_per_param": runs[0]["state_bytes_per_param"],
        "peak_rss_mb": max(peaks) if peaks else None,
    }
    accs = [r["accuracy"] for r in runs if "accuracy" in r]
    if accs:
        s["accuracy_mean"] = statistics.fmean(accs)
    return s


def summarise(task_out: dict) -> None:
    """Add 'summary' to every contender (and 'default_summary' where default runs exist)."""
    cs = task_out["contenders"]
    axis = task_out["eval_steps"]
    base = cs.get(BASELINE)
    base_final = base_ms = None
    if base:
        b = _summary(base["runs"], None, None, axis)
        base_final, base_ms = (b["final_mean"] if math.isfinite(b["final_mean"]) else None), b["step_ms"]
    for entry in cs.values():
        entry["summary"] = _summary(entry["runs"], base_final, base_ms, axis)
        if "default_runs" in entry:
            entry["default_summary"] = _summary(entry["default_runs"], base_final, base_ms, axis)
    finite = {k: e["summary"]["final_mean"] for k, e in cs.items() if math.isfinite(e["summary"]["final_mean"])}
    task_out["winner"] = min(finite, key=finite.get) if finite else None
    task_out["baseline_final"] = base_final
