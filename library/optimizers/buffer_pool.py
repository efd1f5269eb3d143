"""Scratch-tensor pool: reuses temporaries across steps, so after the first step no new
element-sized scratch memory is allocated.

Two kinds: ``get`` returns one buffer per (shape, dtype, device, slot), shared by every
parameter of that shape (for code that updates parameters one after another); ``views``
returns one view per tensor of a chunk, carved from a flat arena per (slot, dtype, device),
for multi-tensor code that updates a whole chunk at once. Arenas are sized by the largest
chunk, so scratch memory is bounded by the chunk size, not by the model size.
"""
from __future__ import annotations

import torch


class FlatList(list):
    """Views that tile ``flat`` back to back, in order (scratch for a chunk): multi-tensor
    operations on them can run as one operation on ``flat`` (techniques/ops.py). ``runs``:
    ``(first, end, offset, numel)`` for each run of consecutive views with the same number of
    elements, so one value per tensor broadcasts over a run as a ``(end - first, numel)`` view.
    ``cache``: vectors derived from the layout (the views' sizes, ...), made on first use."""

    __slots__ = ("flat", "runs", "cache")

    def __init__(self, views, flat):
        super().__init__(views)
        self.flat = flat
        self.cache = {}  # vectors derived from the layout (ops.cached_vector)
        self.runs = []
        first = offset = 0
        for i in range(1, len(views) + 1):
            if i == len(views) or views[i].numel() != views[first].numel():
                n = views[first].numel()
                self.runs.append((first, i, offset, n))
                offset += n * (i - first)
                first = i


class BufferPool:
    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self.hits = 0
        self.allocations = 0

    def get(self, like: torch.Tensor, slot: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (tuple(like.shape), dtype, like.device, slot)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(like.shape, dtype=dtype, device=like.device)
            self._buffers[key] = buf
            self.allocations += 1
        else:
            self.hits += 1
        return buf

    def views(self, tensors, slot, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """One contiguous scratch view per tensor (same shapes), disjoint within the call."""
        return self.aligned(tensors, slot, dtype, 1)[1]

    def aligned(self, tensors, slot, dtype: torch.dtype = torch.float32, align: int = 256):
        """``(flat, views)``: one view per tensor, each starting at a multiple of ``align``
        elements, and the flat arena slice that covers them all (its length is a multiple of
        ``align``; the gaps between views hold stale values: callers that read ``flat``
        zero them with :meth:`gaps`). ``slot`` may be any hashable tag. Without padding (every
        size a multiple of ``align``) the views are a :class:`FlatList` over ``flat``."""
        shapes = tuple(t.shape for t in tensors)
        device = tensors[0].device
        key = ("aligned", slot, dtype, device, shapes, align)
        hit = self._views.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        offsets, total = _aligned_offsets(tensors, align)
        akey = ("arena", dtype, device, slot)
        arena = self._buffers.get(akey)
        if arena is None or arena.numel() < total:
            if arena is not None:
                self._views = {k: v for k, v in self._views.items()
                               if not (k[0] in ("aligned", "gaps") and k[1:4] == (slot, dtype, device))}
            arena = torch.zeros(max(total, 1), dtype=dtype, device=device)
            self._buffers[akey] = arena
            self.allocations += 1
        flat = arena[:total]
        views = [flat[o:o + t.numel()].view(t.shape) for o, t in zip(offsets, tensors)]
        if total == sum(t.numel() for t in tensors):  # no padding: the views tile the flat slice exactly
            views = FlatList(views, flat)
        gaps = [flat[o + t.numel():e] for o, t, e in zip(offsets, tensors, offsets[1:] + [total])]
        gaps = [g for g in gaps if g.numel()]
        if len(self._views) >= 1 << 14:  # chunk layouts changed many times: start over
            self._views.clear()
        self._views[key] = out = (flat, views)
        self._views[("gaps",) + key[1:]] = gaps
        return out

    def gaps(self, tensors, slot, dtype: torch.dtype = torch.float32, align: int = 256) -> list:
        """The padding slices of :meth:`aligned`'s arena for these tensors."""
        self.aligned(tensors, slot, dtype, align)
        key = ("gaps", slot, dtype, tensors[0].device, tuple(t.shape for t in tensors), align)
        return self._views[key]

    def scalars(self, n: int, device, tag) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A reusable fp32 vector of ``n`` values and its 0-dim views (for per-tensor scalars
        handed to multi-tensor ops: fill the vector with ``copy_`` and pass the cached views)."""
        key = ("scalars", tag, n, device)
        hit = self._views.get(key)
        if hit is None:
            vec = torch.zeros(n, dtype=torch.float32, device=device)
            hit = self._views[key] = (vec, list(vec.unbind(0)))
        return hit

    def stats(self) -> dict:
        shapes = {(k[0], k[1], k[2]) for k in self._buffers}
        nbytes = sum(b.numel() * b.element_size() for b in self._buffers.values())
        return {
            "total_buffer_types": len(shapes),
            "total_buffers": len(self._buffers),
            "estimated_memory_mb": nbytes / 2**20,
            "bytes": nbytes,
            "allocations": self.allocations,
            "reuses": self.hits,
        }

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()


def _aligned_offsets(tensors, align: int):
    offsets, off = [], 0
    for t in tensors:
        offsets.append(off)
        off += -(-t.numel() // align) * align
    return offsets, off
