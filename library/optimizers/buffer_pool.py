"""Scratch-tensor pool: reuses temporaries per (shape, dtype, device, slot) across steps.

The per-tensor update writes its temporaries into pooled buffers with ``out=`` or in-place
ops, so after the first step no new element-sized scratch memory is allocated. Buffers of one
shape are shared by every parameter of that shape, because parameters are updated one after
another.
"""
from __future__ import annotations

import torch


class BufferPool:
    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
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
