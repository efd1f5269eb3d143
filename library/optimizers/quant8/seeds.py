"""Deterministic seeds for stochastic rounding: the same saved integers give the same codes, so a
resumed run replays bit-exactly."""
from __future__ import annotations

import zlib

import torch



_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts) -> int:
    """Deterministic 63-bit seed from ints and strings (strings via CRC32, not ``hash()``,
    which is salted per process). ``mix_seed(base_seed, step, param_index, "exp_avg")``."""
    h = 0x6A09E667F3BCC908
    for part in parts:
        if isinstance(part, str):
            part = zlib.crc32(part.encode("utf-8"))
        elif isinstance(part, torch.Tensor):
            raise TypeError("mix_seed takes Python ints (a tensor would force a host sync)")
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1
