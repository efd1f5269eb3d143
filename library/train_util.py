"""sd-scripts-compatible helpers: ``get_optimizer`` with kohya's behaviour plus our names.

``get_optimizer(args, trainable_params) -> (optimizer_name, optimizer_args_str, optimizer)``
resolves, case-insensitively: our registered optimizers (library/optimizers/registry.py),
kohya's built-in names (AdamW, AdamW8bit and the other bitsandbytes names, Lion, SGDNesterov,
DAdapt*, Prodigy, Adafactor, *ScheduleFree), a dotted ``module.Class`` path, or a class of
``torch.optim``. ``--optimizer_args`` strings are parsed by ``parse_optimizer_args`` (first
``=`` splits, unquoted strings accepted); unknown keys for our optimizers are rejected with
the closest match before anything is built.
"""
from __future__ import annotations

import importlib
import logging

import torch

from .optimizers.registry import (
    check_optimizer_kwargs,
    closest_name,
    list_optimizers,
    lookup,
    parse_optimizer_args,
    resolve_class,
)

logger = logging.getLogger(__name__)

__all__ = ["get_optimizer", "parse_optimizer_args", "known_optimizer_names"]

_BNB_NAMES = {
    "adamw8bit": "AdamW8bit",
    "pagedadamw8bit": "PagedAdamW8bit",
    "lion8bit": "Lion8bit",
    "pagedlion8bit": "PagedLion8bit",
    "sgdnesterov8bit": "SGD8bit",
    "pagedadamw": "PagedAdamW",
    "pagedadamw32bit": "PagedAdamW32bit",
}
_DADAPT = {
    "dadaptation": "DAdaptAdamPreprint",
    "dadaptadampreprint": "DAdaptAdamPreprint",
    "dadaptadagrad": "DAdaptAdaGrad",
    "dadaptadam": "DAdaptAdam",
    "dadaptadan": "DAdaptAdan",
    "dadaptadanip": "DAdaptAdanIP",
    "dadaptlion": "DAdaptLion",
    "dadaptsgd": "DAdaptSGD",
}


def known_optimizer_names() -> list[str]:
    ours = [n for info in list_optimizers() for n in (info.name, *info.aliases)]
    builtin = ["AdamW", "Lion", "SGDNesterov", "Prodigy", "Adafactor", "AdamWScheduleFree",
               "RAdamScheduleFree", "SGDScheduleFree"] + sorted(set(_BNB_NAMES.values())) + sorted(set(_DADAPT.values()))
    return ours + builtin


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"optimizer {what!r} needs the package {module.split('.')[0]!r}: pip install it") from None


def _builtin(kind: str, kwargs: dict):
    """kohya's built-in optimizer names -> class (None if not one of them)."""
    if kind in _BNB_NAMES:
        bnb = _import("bitsandbytes.optim", _BNB_NAMES[kind])
        if kind == "sgdnesterov8bit":
            kwargs.setdefault("momentum", 0.9)
            kwargs.setdefault("nesterov", True)
        return getattr(bnb, _BNB_NAMES[kind])
    if kind == "adamw":
        return torch.optim.AdamW
    if kind == "lion":
        return _import("lion_pytorch", "Lion").Lion
    if kind == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        kwargs.setdefault("nesterov", True)
        return torch.optim.SGD
    if kind in _DADAPT:
        return getattr(_import("dadaptation", _DADAPT[kind]), _DADAPT[kind])
    if kind == "prodigy":
        return _import("prodigyopt", "Prodigy").Prodigy
    if kind == "adafactor":
        return _import("transformers.optimization", "Adafactor").Adafactor
    if kind.endswith("schedulefree") and kind in ("adamwschedulefree", "radamschedulefree", "sgdschedulefree"):
        sf = _import("schedulefree", kind)
        return {"adamwschedulefree": sf.AdamWScheduleFree, "radamschedulefree": sf.RAdamScheduleFree,
                "sgdschedulefree": sf.SGDScheduleFree}[kind]
    return None


def resolve_optimizer(optimizer_type: str | None, optimizer_args=None):
    """(class, kwargs, registry info or None) without building anything; raises ValueError."""
    optimizer_type = optimizer_type or "AdamW"
    kwargs = parse_optimizer_args(optimizer_args) if not isinstance(optimizer_args, dict) else dict(optimizer_args)
    cls, info = resolve_class(optimizer_type)
    if cls is None:
        cls = _builtin(optimizer_type.lower(), kwargs)
    if cls is None and hasattr(torch.optim, optimizer_type):
        cls = getattr(torch.optim, optimizer_type)
    if cls is None:
        hint = closest_name(optimizer_type, known_optimizer_names())
        raise ValueError(
            f"unknown optimizer type {optimizer_type!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; known: {', '.join(known_optimizer_names())}, or a dotted module.Class path"
        )
    if info is not None:
        kwargs = {**info.defaults, **kwargs}
    check_optimizer_kwargs(cls, kwargs, label=info.name if info else cls.__name__)
    return cls, kwargs, info


def get_optimizer(args, trainable_params):
    """kohya-compatible: returns ``(optimizer_name, optimizer_args, optimizer)``."""
    optimizer_type = getattr(args, "optimizer_type", None) or ""
    if not optimizer_type:
        if getattr(args, "use_8bit_adam", False):
            optimizer_type = "AdamW8bit"
        elif getattr(args, "use_lion_optimizer", False):
            optimizer_type = "Lion"
        else:
            optimizer_type = "AdamW"
    cls, kwargs, info = resolve_optimizer(optimizer_type, getattr(args, "optimizer_args", None))
    lr = getattr(args, "learning_rate", None)
    if optimizer_type.lower() == "adafactor":
        if kwargs.setdefault("relative_step", True):
            kwargs.setdefault("scale_parameter", True)
            kwargs.setdefault("warmup_init", False)
            lr = None
            for g in trainable_params if isinstance(trainable_params, list) else []:
                if isinstance(g, dict):
                    g.pop("lr", None)
    if lr is None:
        optimizer = cls(trainable_params, **kwargs)
    else:
        optimizer = cls(trainable_params, lr=lr, **kwargs)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    name = f"{cls.__module__}.{cls.__name__}"
    args_str = ",".join(f"{k}={v}" for k, v in kwargs.items())
    logger.info("use %s | %s", name, kwargs)
    return name, args_str, optimizer
