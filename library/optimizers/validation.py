"""Argument checks shared by every optimizer: one-line ValueErrors that name the argument."""
from __future__ import annotations

import math
from numbers import Real

__all__ = [
    "check_real",
    "check_lr",
    "check_lr_bounds",
    "check_betas",
    "check_eps",
    "check_range",
    "check_bool",
    "check_int",
    "check_choice",
]


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_real(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    """Return ``float(value)`` after checking it is a finite real number in the given range."""
    if value is None and allow_none:
        return None
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()  # a 0-dim tensor given at construction time, never inside step()
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise ValueError(f"{name} must be {op} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        op = "<" if hi_open else "<="
        raise ValueError(f"{name} must be {op} {hi}, got {value!r}")
    return value


def check_lr(name: str, value, allow_zero=True):
    return check_real(name, value, lo=0.0, lo_open=not allow_zero)


def check_lr_bounds(min_lr, max_lr) -> tuple[float | None, float | None]:
    """Optional absolute lr bounds of an lr mask: each None or a number (max_lr > 0), min <= max."""
    min_lr = None if min_lr is None else check_lr("min_lr", min_lr)
    max_lr = None if max_lr is None else check_lr("max_lr", max_lr, allow_zero=False)
    if min_lr is not None and max_lr is not None and min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must be <= max_lr ({max_lr})")
    return min_lr, max_lr


def check_eps(name: str, value):
    return check_real(name, value, lo=0.0, lo_open=True)


def check_betas(name: str, value, n: int = 2):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be a tuple of {n} numbers in [0, 1), got {value!r}")
    if len(value) != n:
        raise ValueError(f"{name} must have {n} values, got {len(value)}: {value!r}")
    return tuple(check_real(f"{name}[{i}]", b, lo=0.0, hi=1.0, hi_open=True) for i, b in enumerate(value))


def check_range(name: str, value, lo, hi, **kw):
    return check_real(name, value, lo=lo, hi=hi, **kw)


def check_bool(name: str, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value, *, lo=None, hi=None):
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)!r}, got {value!r}")
    return value
