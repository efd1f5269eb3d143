"""Skip a tensor whose gradient holds NaN or ±inf, without a host sync.

    ok_i = isfinite(||g_i||)                       (one flag per tensor, on the device)
    g_i' = ok_i * nan_to_num(g_i)                  (what the update reads: finite everywhere)
    x_i  <- where(ok_i, x_i(after the update), x_i(before))   for the parameter and every state tensor

The sanitised gradient keeps group-wide quantities (norm sums, standardisers, agreement counts)
finite, so one bad tensor cannot change the others' step; the guard puts the bad tensor and its
state back bit for bit. For an update written one tensor at a time (the Automagic family); the
multi-tensor AdaptiveHinaAdamW folds the same flags into its betas and step sizes instead.
A tensor's step counter (a Python int) still advances, as it does in AdaptiveHinaAdamW.
"""
from __future__ import annotations

import torch


def flags(norms) -> torch.Tensor:
    """Per-tensor finiteness from per-tensor norms (a norm is finite iff every element is)."""
    return torch.stack(list(norms)).float().isfinite()


def finite_norms(norms, ok: torch.Tensor) -> list[torch.Tensor]:
    """The norms of the sanitised gradients: the same values where finite, 0 where not."""
    zero = torch.zeros((), dtype=torch.float32, device=ok.device)
    return list(torch.where(ok, torch.stack(list(norms)).float(), zero).unbind(0))


def sanitize(grad: torch.Tensor, ok: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``ok * nan_to_num(grad)`` into the fp32 buffer ``out`` (equal to ``grad`` where finite)."""
    if grad.dtype == out.dtype:
        torch.nan_to_num(grad, 0.0, 0.0, 0.0, out=out)
    else:  # a bf16 / fp16 gradient: widen first
        torch.nan_to_num_(out.copy_(grad), 0.0, 0.0, 0.0)
    return out.mul_(ok)


def snapshot(p: torch.Tensor, st: dict, pool) -> list[tuple[str | None, torch.Tensor]]:
    """Copies of the parameter (key None) and of every tensor in its state, in pooled buffers."""
    saved = [(None, pool.get(p, ("nonfinite", None), p.dtype).copy_(p))]
    for key, value in st.items():
        if isinstance(value, torch.Tensor):
            saved.append((key, pool.get(value, ("nonfinite", key), value.dtype).copy_(value)))
    return saved


def restore_(p: torch.Tensor, st: dict, saved, ok: torch.Tensor) -> None:
    """Where ``ok`` is False, put back what :func:`snapshot` copied (bit for bit)."""
    for key, old in saved:
        now = p if key is None else st.get(key)
        if isinstance(now, torch.Tensor) and now.shape == old.shape:
            torch.where(ok, now, old, out=now)
