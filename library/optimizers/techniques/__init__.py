"""One file per published technique: small functions over tensors, each with its equation.

Every function works on one parameter tensor (fp32 math), never mutates ``p.grad``, and
never reads a value back to the host: per-tensor scalars stay 0-dim tensors.
"""
