"""One training run of the quality benchmark, and the worker process that runs them.

``train_one(task, cfg)`` trains the task's LoRA with the optimizer and schedule of a
:class:`~benchmarks.quality.contenders.RunConfig` and records:

- the held-out curve (evaluations evenly spaced, step 0 included: the loss before
  fine-tuning) and the final held-out loss (+inf if the training or held-out loss became
  non-finite, or the optimizer raised: then ``error`` says why);
- a bucketed training-loss curve;
- step time: median wall time of ``optimizer.step()`` over the run;
- optimizer state bytes per trainable parameter at the end (``benchmarks.common.state_bytes``);
- peak memory: the process's peak resident set size during the run minus its resident size
  just before the optimizer was built, read from ``/proc/self/status`` (VmHWM, reset through
  ``/proc/self/clear_refs`` after ``gc.collect()`` + ``malloc_trim(0)``); falls back to
  ``resource.getrusage`` (not resettable) elsewhere. It counts optimizer state, gradients,
  activations and allocator effects, so differences below ~1 MB are noise.

The lr schedule is diffusers' ``get_scheduler(cfg.scheduler, num_warmup_steps=cfg.warmup_steps)``
(none for ``constant``); schedule-free optimizers are evaluated in ``optimizer.eval()`` mode.
Before its first measured run of a (task, optimizer class), a process makes a throwaway two-step
run, so that library loading and lazily built tables stay out of the measurements.
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
from benchmarks.quality.contenders import RunConfig, build_optimizer


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
def eval_steps(steps: int, evals: int) -> list[int]:
    return sorted({round(steps * i / evals) for i in range(evals + 1)})


def make_scheduler(cfg: RunConfig, opt):
    if cfg.scheduler == "constant":
        return None
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


def _train_loop(run, opt, sched, steps: int, points: list[int]) -> dict:
    """The steps of one run: (losses, step times, held-out curve, diverged)."""
    losses, step_ms, curve = [], [], []
    if 0 in points:
        curve.append(run.evaluate())
    for step in range(steps):
        loss = run.loss(step)
        value = float(loss.detach())
        if not math.isfinite(value):
            return {"losses": losses, "step_ms": step_ms, "curve": curve, "diverged": True}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_ms.append(1e3 * (time.perf_counter() - t0))
        if hasattr(opt, "report_loss"):
            opt.report_loss(loss.detach())  # as train_network.py: C-Optim's loss context
        if sched is not None:
            sched.step()
        losses.append(value)
        if step + 1 in points:
            curve.append(run.evaluate())
            if not math.isfinite(curve[-1]):
                return {"losses": losses, "step_ms": step_ms, "curve": curve, "diverged": True}
    return {"losses": losses, "step_ms": step_ms, "curve": curve, "diverged": False}


def train_one(task, cfg: RunConfig, evals: int | None = None) -> dict:
    """One run of `cfg` on `task` (set up); see the module docstring for what is recorded."""
    points = eval_steps(cfg.steps, evals or task.evals)
    t_start = time.perf_counter()
    run = task.new_run(cfg.seed)
    error, extra, sb, peak = None, {}, 0, None
    try:
        rss0, method = reset_peak()
        try:
            opt = build_optimizer(cfg, run.groups, run.named)
            sched = make_scheduler(cfg, opt)
            if callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None)):
                run._eval_mode, run._train_mode = opt.eval, opt.train  # schedule-free: evaluate the averaged x
            out = _train_loop(run, opt, sched, cfg.steps, points)
            peak, sb = peak_kb(method), state_bytes(opt)
            if hasattr(run, "accuracy") and not out["diverged"]:
                with torch.no_grad():
                    extra["accuracy"] = run.accuracy()
        except (ValueError, TypeError, RuntimeError) as e:  # a configuration the optimizer refuses
            error = f"{type(e).__name__}: {e}"
            out = {"losses": [], "step_ms": [], "curve": [], "diverged": True}
        n_params = sum(p.numel() for _, p in run.named)
    finally:
        run.close()
    return _record(cfg, out, points, sb, n_params, peak, rss0, method, error, extra, t_start)


def _record(cfg, out, points, sb, n_params, peak, rss0, method, error, extra, t_start) -> dict:
    losses, curve, diverged = out["losses"], out["curve"], out["diverged"]
    tail = losses[int(0.8 * len(losses)):]
    return {
        "config": cfg.describe(), "seed": cfg.seed, "lr": cfg.lr,
        "final": curve[-1] if curve and not diverged else math.inf, "diverged": diverged, "error": error,
        "eval_steps": points[:len(curve)], "curve": curve,
        "train_loss": _buckets(losses, min(50, max(1, len(losses) // 4))),
        "train_loss_tail_mean": statistics.fmean(tail) if tail else None,
        "step_ms_median": statistics.median(out["step_ms"]) if out["step_ms"] else None,
        "state_bytes": sb, "n_params": n_params, "state_bytes_per_param": sb / max(1, n_params),
        "peak_rss_mb": None if peak is None or rss0 is None else (peak - rss0) / 1024.0, "peak_method": method,
        "seconds": time.perf_counter() - t_start, **extra,
    }


def warm_up(task, cfg: RunConfig, steps: int = 2) -> None:
    """A throwaway two-step run: library loading, lazily built tables (the 8-bit classes' random
    table) and first-call allocations stay out of the measured runs."""
    run = task.new_run(cfg.seed)
    try:
        opt = build_optimizer(cfg, run.groups, run.named)
        for step in range(steps):
            loss = run.loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        run.evaluate()
        del opt
    except (ValueError, TypeError, RuntimeError):
        pass  # the measured run records the error
    finally:
        run.close()


def _buckets(xs, n):
    """Means of `n` equal slices of xs (a compact training curve): [(end_step, mean)]."""
    out = []
    for i in range(n if xs else 0):
        a, b = len(xs) * i // n, len(xs) * (i + 1) // n
        if b > a:
            out.append([b, statistics.fmean(xs[a:b])])
    return out


# ----------------------------------------------------------------------------- worker process
class Worker:
    """Runs RunConfigs in this process: one set-up task object per task name, one warm-up per
    (task, optimizer class)."""

    def __init__(self, task_factory, threads: int = 1, log=None):
        self._factory = task_factory  # name -> a task object (not yet set up)
        self._threads = threads
        self._tasks: dict = {}
        self._warm: set = set()
        self._log = log

    def task(self, name: str):
        if name not in self._tasks:
            task = self._factory(name)
            task.setup(self._log or (lambda msg: None))
            self._tasks[name] = task
        return self._tasks[name]

    def run(self, cfg: RunConfig) -> dict:
        torch.set_num_threads(self._threads)
        task = self.task(cfg.task)
        if (cfg.task, cfg.class_path) not in self._warm:
            warm_up(task, cfg)
            self._warm.add((cfg.task, cfg.class_path))
        return train_one(task, cfg)


_WORKER: Worker | None = None


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the main process dies (no orphans burning CPU)."""
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def init_process(task_factory, threads: int) -> None:
    """Pool initializer: this process's Worker."""
    global _WORKER
    _die_with_parent()
    torch.set_num_threads(threads)
    _WORKER = Worker(task_factory, threads)


def run_in_process(item: tuple[str, RunConfig]) -> tuple[str, dict]:
    run_id, cfg = item
    return run_id, _WORKER.run(cfg)
