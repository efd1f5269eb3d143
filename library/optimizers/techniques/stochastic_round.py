"""Stochastic rounding of fp32 values to bf16 (for bf16 parameters, sd-scripts' full_bf16).

bf16 keeps the top 16 bits of the fp32 pattern. Rounding to nearest drops any update smaller
than half a bf16 ulp (2^-8 relative), so small learning rates stall on bf16 weights.
Stochastic rounding adds a uniform random integer in [0, 2^16) to the fp32 bit pattern and
clears the low 16 bits: the result rounds up (away from zero, the pattern being
sign-magnitude) with probability equal to the dropped fraction, so E[round(x)] = x.
Finite values only (the caller's values are finite; an fp32 value within one bf16 ulp of
the largest finite one may round to inf).
"""
from __future__ import annotations

import torch

LOW_BITS = 16
_KEEP = -(1 << LOW_BITS)  # 0xFFFF0000 as a signed int32


def round_to_bf16_(values: torch.Tensor, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """In place on the flat fp32 ``values``: make every element exactly representable in bf16
    by stochastic rounding. ``noise`` is int32 scratch of the same length; ``seed`` a Python
    int (the same seed and input give the same result)."""
    gen = torch.Generator(device=values.device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    torch.randint(0, 1 << LOW_BITS, noise.shape, generator=gen, dtype=torch.int32, device=values.device, out=noise)
    bits = values.view(torch.int32)
    bits.add_(noise)
    bits.bitwise_and_(_KEEP)
    return values
