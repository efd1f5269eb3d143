"""Shared benchmark plumbing: parameter sets, timing, results files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_params(shapes, seed=0, grad_scale=1e-3, dtype=torch.float32, device=None):
    """[(name, Parameter)] with random values and gradients attached (drawn on the CPU, so the
    values are the same on every ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).mul_(grad_scale).to(device=device, dtype=dtype)
        out.append((name, p))
    return out


def time_steps(opt, warmup=3, repeats=11, stat="min"):
    """Wall time of ``opt.step()`` in milliseconds (gradients stay attached).

    ``stat="min"`` (default): the minimum over ``repeats`` steps, because on a shared machine
    other processes only ever add time; ``"median"`` is available too. With CUDA parameters the
    device is synchronised before each clock read, so a step's time includes its kernels.
    """
    sync = _synchronizer(opt)
    for _ in range(warmup):
        opt.step()
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        ts.append(time.perf_counter() - t0)
    return 1e3 * (min(ts) if stat == "min" else statistics.median(ts))


def _synchronizer(opt):
    """Waits for the optimizer's CUDA devices (a no-op for CPU parameters)."""
    devices = {p.device for g in opt.param_groups for p in g["params"] if p.device.type == "cuda"}
    return (lambda: [torch.cuda.synchronize(d) for d in devices]) if devices else (lambda: None)


def tensor_bytes(value) -> int:
    """Bytes of every tensor in ``value`` (nested dicts, lists and tuples)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def state_bytes(opt) -> int:
    """Memory behind ``opt.state``: every storage once (arenas of 8-bit codes with their block
    padding; ``tensor_bytes`` counts elements, so per-key sums can be slightly lower)."""
    from library.optimizers.engine import storage_bytes

    return storage_bytes(list(opt.state.values()))


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    with open(path + ".tmp", "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
