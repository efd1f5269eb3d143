"""Skip a tensor whose gradient holds NaN or ±inf, without a host sync.

    ok_i = isfinite(||g_i||)                       (one flag per tensor, on the device)
    g_i' = ok_i * nan_to_num(g_i)                  (what the update reads: finite everywhere)

The sanitised gradient keeps group-wide quantities (norm sums, standardisers, agreement counts)
finite, so one bad tensor cannot change the others' step. A skipped tensor must then come out
bit-identical, in two ways chosen by cost:

- element-sized fp32 state and the parameter are *gated* (:class:`Gate`): momenta decay by
  ``keep = ok ? beta : 1``, the step and the decay are multiplied by ``ok`` (x * 1.0 is exact,
  so a finite tensor's update keeps its bits); an lr mask does not move since the sign
  agreement of a zero gradient is 0;
- everything else (factored statistics, 0-dim scalars, 8-bit codes re-stored with stochastic
  rounding, a preset's own state) is copied before the update and put back after it
  (:class:`Guard`).

Gate and Guard are used by the Automagic family; AdaptiveHinaAdamW folds the same flags into its
betas and step sizes. Both sanitise with :func:`sanitize_list_`. A tensor's step counter (a
Python int) still advances.

The restore works on bit patterns (each tensor viewed as the integer type of its width), so it
gives back exactly the old bits where ``ok`` is 0 and leaves ``x`` untouched where it is 1, for
every dtype (fp32, bf16, the 8-bit codes): state lying in an arena slice is restored as
``x ^= (x ^ old) & m`` (``m`` all ones for a skipped tensor, one operation per run of same-sized
tensors), other tensors as ``x += (old - x) * (1 - ok)`` in wrap-around integer arithmetic (a few
multi-tensor calls for the whole group).
"""
from __future__ import annotations

import torch

from . import constants, ops

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def flags(norms) -> torch.Tensor:
    """Per-tensor finiteness from per-tensor norms (a norm is finite iff every element is)."""
    return torch.stack(list(norms)).float().isfinite()


def finite_norms(norms, ok: torch.Tensor) -> list[torch.Tensor]:
    """The norms of the sanitised gradients: the same values where finite, 0 where not."""
    zero = torch.zeros((), dtype=torch.float32, device=ok.device)
    return list(torch.where(ok, torch.stack(list(norms)).float(), zero).unbind(0))


def sanitize_list_(outs, grads, oks: torch.Tensor | None = None) -> None:
    """``nan_to_num(grad)`` into fp32 scratch ``outs`` (chunk scratch: one flat pass), times
    ``oks`` (one 0/1 value per tensor) when given; a caller that folds ``ok`` into a later pass
    leaves it out. Equal to ``grad`` where finite."""
    ops.copy_(outs, grads)  # widens bf16 / fp16 gradients
    flat = getattr(outs, "flat", None)
    if flat is not None:
        flat.nan_to_num_(0.0, 0.0, 0.0)
    else:
        for x in outs:
            x.nan_to_num_(0.0, 0.0, 0.0)
    if oks is not None:
        ops.per_tensor_("mul_", outs, oks)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


class Gate:
    """Per-tensor 0-dim factors, on the device, that make a skipped tensor's in-place updates identities."""

    def __init__(self, ok: torch.Tensor):
        self.ok = ok
        self.okf = ok.float()  # 1 where finite, 0 where not: multiplies a tensor's step and decay
        self._keeps: dict = {}

    def keeps(self, value: float) -> torch.Tensor:
        """``value`` (as fp32, exactly what a Python scalar becomes) where the tensor is finite, 1
        where it is skipped, one entry per tensor: the factor of an EMA's old value, or of ``p`` in
        ``p <- p * (1 - lr wd)``."""
        vec = self._keeps.get(value)
        if vec is None:
            one = torch.ones((), dtype=torch.float32, device=self.ok.device)
            vec = self._keeps[value] = torch.where(self.ok, torch.full_like(one, value), one)
        return vec


class Guard:
    """Copies of a group's state tensors (all but the ``gated`` keys), taken before the update,
    and the restore of those whose gradient was not finite (:meth:`restore`). The parameters
    themselves are gated in the math (:class:`Gate`), never copied.

    A key whose tensors tile one arena slice (``tiled``: ``state_store.Arenas.tiled``, with
    ``states`` in arena order) is copied as one flat tensor and restored with one masked XOR per
    run of same-sized tensors; the other tensors are copied one by one, by bit width."""

    def __init__(self, states, pool, gated=(), tiled=None):
        entries = [(i, k) for i, st in enumerate(states) for k, v in st.items()
                   if isinstance(v, torch.Tensor) and k not in gated]
        self._slices = []  # (key, state indices, FlatList of the state tensors, flat copy)
        if tiled is not None:
            entries = self._copy_slices(states, pool, entries, tiled)
        self.entries = entries
        self._copies = {}
        for (dtype, _), idx in self._by_width(states).items():
            now = [_bits(self._tensor(states, self.entries[j])) for j in idx]
            copies = pool.views(now, ("nonfinite", dtype), dtype)
            torch._foreach_copy_(copies, now)
            self._copies[idx[0]] = (dtype, idx, copies)

    def _copy_slices(self, states, pool, entries, tiled) -> list:
        """Copy each key whose tensors tile an arena slice at once; return the other entries."""
        rows: dict = {}
        for i, key in entries:
            rows.setdefault(key, []).append(i)
        rest = []
        for key, idx in rows.items():
            now = tiled([states[i][key] for i in idx])
            if getattr(now, "flat", None) is None:
                rest += [(i, key) for i in idx]
                continue
            copy = pool.views([now.flat], ("nonfinite", key), _BITS[now.flat.element_size()])[0]
            copy.copy_(_bits(now.flat))
            self._slices.append((key, idx, now, copy))
        return rest

    @staticmethod
    def _tensor(states, entry):
        i, key = entry
        return states[i].get(key)

    def _by_width(self, states) -> dict:
        """Entry indices by (integer type of the same width, device): one arena each."""
        groups: dict = {}
        for j, entry in enumerate(self.entries):
            t = self._tensor(states, entry)
            groups.setdefault((_BITS[t.element_size()], t.device), []).append(j)
        return groups

    def restore(self, states, ok: torch.Tensor) -> None:
        """Where ``ok[i]`` is False, put back the copied state of tensor i exactly as it was."""
        for key, idx, now, copy in self._slices:
            if any(states[i].get(key) is not t for i, t in zip(idx, now)):  # replaced during the step
                olds = [c.view(t.shape) for c, t in zip(copy.split([t.numel() for t in now]), now)]
                self._restore_each(states, ok, [(i, key) for i in idx], olds)
                continue
            bad = ~ok if len(idx) == len(states) else (~ok).index_select(0, constants.index_vector(idx, ok.device))
            _restore_runs_(_bits(now.flat), copy, now.runs, bad)
        for dtype, idx, copies in self._copies.values():
            self._restore_each(states, ok, [self.entries[j] for j in idx], copies, dtype)

    @staticmethod
    def _restore_each(states, ok, entries, copies, dtype=None) -> None:
        """The per-tensor restore: ``x += (old - x) * (1 - ok)`` on bit patterns (wrapping)."""
        keep = []
        for (i, key), c in zip(entries, copies):
            now = states[i].get(key)
            if isinstance(now, torch.Tensor) and now.shape == c.shape and now.element_size() == c.element_size():
                keep.append((i, c, _bits(now)))
        if not keep:
            return
        bad = (~ok).to(dtype or keep[0][1].dtype).unbind(0)
        diffs = [c for _, c, _ in keep]
        nows = [now for _, _, now in keep]
        torch._foreach_sub_(diffs, nows)  # the copies become old - now (wrapping)
        torch._foreach_mul_(diffs, [bad[i] for i, _, _ in keep])
        torch._foreach_add_(nows, diffs)


def _restore_runs_(now: torch.Tensor, old: torch.Tensor, runs, bad: torch.Tensor) -> None:
    """``now <- old`` over the tensors flagged in ``bad`` (``now``, ``old``: flat bit patterns of
    one integer type; ``runs`` as in ``buffer_pool.FlatList``): ``now ^= (now ^ old) & m`` with
    ``m`` all ones for a flagged tensor and 0 otherwise, one AND per run of same-sized tensors.
    ``old`` is consumed."""
    old.bitwise_xor_(now)
    ones = bad.to(old.dtype).neg_()  # all bits set where flagged
    for first, end, offset, n in runs:
        k = end - first
        old[offset:offset + k * n].view(k, n).bitwise_and_(ones[first:end].unsqueeze(1))
    now.bitwise_xor_(old)
