"""Optimizer registry: one table of names -> classes, and ``--optimizer_args`` parsing.

Lookups are case-insensitive; each entry is a frozen record with a lazy import path, so
looking a name up never imports bitsandbytes or anything else the optimizer does not use.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "OptimInfo",
    "register",
    "lookup",
    "list_optimizers",
    "resolve_class",
    "parse_optimizer_args",
    "check_optimizer_kwargs",
    "closest_name",
]


@dataclass(frozen=True)
class OptimInfo:
    name: str
    target: str  # "package.module:ClassName", imported on first use
    description: str
    aliases: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def load(self):
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


_TABLE: dict[str, OptimInfo] = {}
_ORDER: list[OptimInfo] = []


def register(info: OptimInfo) -> OptimInfo:
    for key in (info.name, *info.aliases):
        low = key.lower()
        if low in _TABLE and _TABLE[low] is not info:
            raise ValueError(f"optimizer name {key!r} is registered twice")
        _TABLE[low] = info
    _ORDER.append(info)
    return info


def lookup(name: str) -> OptimInfo | None:
    return _TABLE.get(name.lower())


def list_optimizers() -> list[OptimInfo]:
    return list(_ORDER)


def closest_name(name: str, choices) -> str | None:
    """The closest of ``choices`` to ``name`` (exact case first, then ignoring case), or None."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if not found:
        low = {c.lower(): c for c in choices}
        found = [low[c] for c in difflib.get_close_matches(name.lower(), list(low), n=1, cutoff=0.5)]
    return found[0] if found else None


def resolve_class(name: str):
    """Class for a registered name or alias, or a dotted ``module.Class`` path."""
    info = lookup(name)
    if info is not None:
        return info.load(), info
    if "." in name:
        module, _, cls = name.rpartition(".")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"cannot import optimizer module {module!r} for {name!r}: {e}") from None
        if not hasattr(mod, cls):
            raise ValueError(f"module {module!r} has no optimizer class {cls!r}")
        return getattr(mod, cls), None
    return None, None


_LITERALS = {"true": True, "false": False, "none": None, "null": None}


def parse_optimizer_args(args) -> dict:
    """Parse ``["key=value", ...]`` (kohya's ``--optimizer_args``), more forgivingly than upstream.

    Splits on the first ``=`` (values may contain ``=``), evaluates Python literals
    (``betas=0.9,0.99`` is a tuple), accepts ``true``/``false``/``none`` in any case, and keeps
    an unquoted word as a string. A malformed item raises a one-line ValueError naming it.
    """
    out: dict = {}
    if args is None:
        return out
    if isinstance(args, str):
        args = args.split()
    for item in args:
        if not isinstance(item, str):
            raise ValueError(f"optimizer argument {item!r} must be a 'key=value' string")
        if "=" not in item:
            raise ValueError(f"optimizer argument {item!r} must look like key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ValueError(f"optimizer argument {item!r}: {key!r} is not a valid argument name")
        value = value.strip()
        if value.lower() in _LITERALS:
            out[key] = _LITERALS[value.lower()]
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            out[key] = value
    return out


def accepted_kwargs(cls) -> tuple[set[str], bool]:
    """Keyword names the constructor takes (besides params), and whether it has **kwargs."""
    sig = inspect.signature(cls.__init__)
    names, var_kw = set(), False
    for i, (n, prm) in enumerate(sig.parameters.items()):
        if i == 0 or n == "params":
            continue
        if prm.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif prm.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(n)
    return names, var_kw


def check_optimizer_kwargs(cls, kwargs: Mapping[str, Any], label: str | None = None) -> None:
    """Reject unknown keys with the closest match and the accepted list (any class whose
    constructor names its arguments: ours, torch.optim's, third-party ones without **kwargs)."""
    try:
        names, var_kw = accepted_kwargs(cls)
    except (TypeError, ValueError):  # a constructor without a Python signature: let it check
        return
    if var_kw:
        return
    label = label or cls.__name__
    for key in kwargs:
        if key not in names:
            hint = closest_name(key, names)
            hint = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(
                f"unknown optimizer argument {key!r} for {label}{hint}; accepted: {', '.join(sorted(names))}"
            )


# --------------------------------------------------------------------- table
register(
    OptimInfo(
        "AdaptiveHinaAdamW",
        "library.optimizers.adaptive_hina:AdaptiveHinaAdamW",
        "AdamW + AGR, OrthoGrad, ADOPT, TAM, Grams, Cautious, lr mask, SPD, dynamic WD, importance, pairing",
    )
)
register(
    OptimInfo(
        "HinaAdaptiveAdamW8bit",
        "library.optimizers.adaptive_hina:AdaptiveHinaAdamW",
        "AdaptiveHinaAdamW with 8-bit state (the old fork's name)",
        defaults=MappingProxyType({"optim_bits": 8}),
    )
)
register(
    OptimInfo(
        "HinaAdamWOptimizer",
        "library.optimizers.hina_adamw:HinaAdamWOptimizer",
        "AdamW with LoRA/LoKr/LoHa-aware learning rates (LoRA+ ratio, ALLoRA rows, Kronecker scale) and type-specific decay",
        aliases=("HinaAdamW",),
    )
)
register(
    OptimInfo(
        "HinaAdamWOptimizer8bit",
        "library.optimizers.hina_adamw:HinaAdamWOptimizer",
        "HinaAdamWOptimizer with 8-bit state (the old fork's name)",
        defaults=MappingProxyType({"optim_bits": 8}),
    )
)
register(
    OptimInfo(
        "Automagic_CameAMP",
        "library.optimizers.automagic:Automagic_CameAMP",
        "CAME + Automagic per-element lr mask, AGR, TAM then momentum decay, Grams blend, early OrthoGrad, ALLoRA rows, AdaDecay",
    )
)
register(
    OptimInfo(
        "Automagic_CameAMP8bit",
        "library.optimizers.automagic:Automagic_CameAMP8bit",
        "Automagic_CameAMP with 8-bit momenta and a log-coded lr mask (seeded, exact resume), fp32 factored statistics",
    )
)
register(
    OptimInfo(
        "Automagic_CameAMP_COptim",
        "library.optimizers.automagic:Automagic_CameAMP_COptim",
        "Automagic_CameAMP + Cautious mask, slow momentum, closure-free context lr multiplier (report_loss)",
    )
)
register(
    OptimInfo(
        "Automagic_CameAMP_COptim8bit",
        "library.optimizers.automagic:Automagic_CameAMP_COptim8bit",
        "Automagic_CameAMP_COptim with 8-bit element-sized state",
    )
)
register(
    OptimInfo(
        "RefactoredAutomagicCameAMP",
        "library.optimizers.automagic_refactored:RefactoredAutomagicCameAMP",
        "Automagic_CameAMP with OptimizerConfig, four training phases and pluggable regularisers",
        aliases=("Automagic_CameAMP_Refactored", "Automagic_CameAMP_Improved"),
    )
)
