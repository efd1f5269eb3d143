"""Shared test helpers (plain functions, imported by the test modules)."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch

UPSTREAM_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "upstream" / "sd-scripts-48d368fa.tar.gz"


def upstream_archive() -> Path:
    """The real upstream sd-scripts archive, or skip (fail under CI, where it is expected)."""
    if not UPSTREAM_ARCHIVE.is_file():
        reason = f"upstream sd-scripts archive not found at {UPSTREAM_ARCHIVE}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: it is expected there)")
        pytest.skip(reason)
    return UPSTREAM_ARCHIVE


@contextlib.contextmanager
def cache_dir_env(folder):
    """HINA_CACHE_DIR pointing at ``folder`` for the duration (the embedded models and data live there)."""
    old = os.environ.get("HINA_CACHE_DIR")
    os.environ["HINA_CACHE_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("HINA_CACHE_DIR", None)
        else:
            os.environ["HINA_CACHE_DIR"] = old


def save_load(obj):
    """torch.save then torch.load(weights_only=True), as accelerate does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_sync():
    """Make every tensor -> Python conversion raise (item, bool, float, int, tolist)."""
    names = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def make(n):
        def fail(self, *a, **k):
            raise HostSync(f"host sync via Tensor.{n} inside step()")

        return fail

    try:
        for n in names:
            setattr(torch.Tensor, n, make(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@contextlib.contextmanager
def forbid_host_copies():
    """Make every tensor built from Python data raise (torch.tensor, torch.as_tensor): on a GPU each
    is a host-to-device copy that waits for the device's queue. Layout-derived constants are made
    on a layout's first step, so a test steps once or twice before entering this."""
    names = ["tensor", "as_tensor"]
    saved = {n: getattr(torch, n) for n in names}

    def make(n):
        def fail(*a, **k):
            raise HostSync(f"host-to-device copy via torch.{n} inside step()")

        return fail

    try:
        for n in names:
            setattr(torch, n, make(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch, n, f)


def quadratic_params(seed=0, shapes=((8, 5), (5,), (3, 4, 2, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def run_quadratic(opt, params, steps, seed=1):
    """Deterministic noisy quadratic: grad = p - target + noise (fixed per step)."""
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = sum(((p - t) ** 2).sum() + 0.1 * (p * torch.randn(p.shape, generator=gen)).sum() for p, t in zip(params, targets))
        loss.backward()
        opt.step()
    return params


def step_in_lockstep(pairs, steps, gen):
    """Step several optimizers ``[(optimizer, params), ...]`` with identical random gradients
    (the same draw for the i-th tensor of every list), ``steps`` times."""
    lists = [params for _, params in pairs]
    for _ in range(steps):
        for tensors in zip(*lists):
            g = torch.randn(tensors[0].shape, generator=gen)
            for x in tensors:
                x.grad = g.clone()
        for opt, _ in pairs:
            opt.step()
