"""Glue loaded inside an sd-scripts process: our optimizers, our argument parser, parameter names.

The blocks ``python -m patches.apply`` inserts into sd-scripts call into this file; it is loaded
by file path (``importlib.util.spec_from_file_location``) under the module name
``hina_sdscripts``, so nothing is added to ``sys.path``.

Why not put this repository on ``sys.path``? Both projects have top-level ``library`` and
``networks`` packages. sd-scripts' ``library`` is a regular package found first, so ours would
be invisible; sd-scripts' ``networks`` has no ``__init__.py`` (a namespace package), so our
regular ``networks`` package would win wherever it sits on the path and replace theirs
(``--network_module networks.lora`` would load our file). Instead :func:`install` appends our
``library`` directory to the ``__path__`` of the already imported ``library`` package: their
modules keep priority for every name both have, and ``library.optimizers`` plus
``library.custom_hina_*`` (which only we have) resolve to our files. ``networks/names.py`` is
loaded by file path under a private name.

Zero-patch use: with ``PYTHONPATH=<this repo>/patches``, ``--optimizer_type
hina_sdscripts.AdaptiveHinaAdamW`` (any registered name or alias after the dot) works in an
unpatched sd-scripts through the module ``__getattr__`` below (upstream's argument parser and
no parameter names, see docs/integration.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

__all__ = ["install", "resolve", "is_ours", "build_optimizer", "attach_names"]

logger = logging.getLogger("hina_sdscripts")

_DEFAULT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_installed_root: str | None = None
# dotted paths that point at our classes (handled by us, with our parser and names)
_OUR_MODULES = ("library.optimizers.", "library.custom_hina_", "hina_sdscripts")


def _root(root: str | None) -> str:
    return os.path.abspath(root or os.environ.get("HINA_OPTIMIZERS_ROOT") or _installed_root or _DEFAULT_ROOT)


def install(root: str | None = None) -> str:
    """Make ``library.optimizers`` (ours) importable next to the host's ``library`` package."""
    global _installed_root
    root = _root(root)
    ours = os.path.join(root, "library")
    if not os.path.isfile(os.path.join(ours, "optimizers", "registry.py")):
        raise ImportError(
            f"hina-optimizers: no optimizer package under {root!r} (library/optimizers/registry.py); "
            "set HINA_OPTIMIZERS_ROOT to the repository, or undo the patch with "
            "`python -m patches.apply --sd-scripts PATH --revert`"
        )
    try:
        library = importlib.import_module("library")
    except ImportError:  # no host package at all (plain Python): our repository provides it
        if root not in sys.path:
            sys.path.append(root)
        library = importlib.import_module("library")
    path = getattr(library, "__path__", None)
    if path is None:
        raise ImportError(f"hina-optimizers: the module 'library' ({library!r}) is not a package")
    norm = {os.path.normcase(os.path.abspath(p)) for p in path}
    if os.path.normcase(ours) not in norm:
        path.append(ours)  # after the host's own directories: theirs win on shared names
    _installed_root = root
    registry = importlib.import_module("library.optimizers.registry")
    found = os.path.normcase(os.path.abspath(registry.__file__))
    if not found.startswith(os.path.normcase(ours) + os.sep):
        logger.warning(
            "hina-optimizers: library.optimizers is loaded from %s, not from %s "
            "(an old copy inside the sd-scripts checkout shadows ours; remove it)",
            os.path.dirname(found), os.path.join(ours, "optimizers"),
        )
    return root


def _registry():
    install()
    return importlib.import_module("library.optimizers.registry")


def resolve(optimizer_type):
    """``(class, OptimInfo)`` if `optimizer_type` names one of our optimizers, else None.

    Accepts every registered name and alias (case-insensitive) and dotted paths to our modules
    (``library.custom_hina_adaptive_adamw_optimizer.AdaptiveHinaAdamW``). Anything else,
    including kohya's own names, returns None without importing anything but our registry.
    """
    if not optimizer_type or not isinstance(optimizer_type, str):
        return None
    registry = _registry()
    info = registry.lookup(optimizer_type)
    if info is not None:
        return info.load(), info
    if "." not in optimizer_type or not optimizer_type.startswith(_OUR_MODULES):
        return None
    module_name, _, cls_name = optimizer_type.rpartition(".")
    if module_name == "hina_sdscripts":
        info = registry.lookup(cls_name)
        return (info.load(), info) if info is not None else None
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        return None  # let sd-scripts report it in its own words
    for info in registry.list_optimizers():
        try:
            if info.load() is cls:
                return cls, info
        except ImportError:
            continue
    return None


def is_ours(optimizer_type) -> bool:
    return resolve(optimizer_type) is not None


def build_optimizer(args, optimizer_type, trainable_params):
    """Our branch of sd-scripts' ``get_optimizer``: ``(name, args_str, optimizer)`` or None.

    `optimizer_type` is sd-scripts' lowercased name; the original spelling in
    ``args.optimizer_type`` is preferred (dotted paths are case-sensitive).
    ``--optimizer_args`` go through our parser (first ``=`` splits, unquoted words are strings,
    ``true``/``false`` in any case); unknown keys fail with the closest accepted name.
    """
    hit = resolve(getattr(args, "optimizer_type", None) or optimizer_type)
    if hit is None and optimizer_type != getattr(args, "optimizer_type", None):
        hit = resolve(optimizer_type)
    if hit is None:
        return None
    cls, info = hit
    registry = _registry()
    kwargs = {**dict(info.defaults), **registry.parse_optimizer_args(getattr(args, "optimizer_args", None))}
    registry.check_optimizer_kwargs(cls, kwargs, label=info.name)
    lr = getattr(args, "learning_rate", None)
    logger.info("use %s optimizer | %s", info.name, kwargs)
    if lr is None:
        optimizer = cls(trainable_params, **kwargs)
    else:
        optimizer = cls(trainable_params, lr=lr, **kwargs)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # sd-scripts does this for schedule-free optimizers; harmless otherwise
    name = f"{cls.__module__}.{cls.__name__}"
    args_str = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return name, args_str, optimizer


_names_module = None


def _names():
    global _names_module
    if _names_module is None:
        path = os.path.join(_root(None), "networks", "names.py")
        module = sys.modules.get("hina_sdscripts_names")
        if module is None:
            spec = importlib.util.spec_from_file_location("hina_sdscripts_names", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["hina_sdscripts_names"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop("hina_sdscripts_names", None)
                raise
        _names_module = module
    return _names_module


def attach_names(trainable_params, network, args=None):
    """Add ``named`` lists (from ``network.named_parameters()``) to the optimizer param groups.

    Only for our optimizers when `args` is given (other optimizers get their groups untouched).
    Accepts what ``prepare_optimizer_params`` returns: a list of group dicts, a
    ``(groups, descriptions)`` tuple, or a bare list of tensors (wrapped into one named group,
    which torch optimizers treat the same). Returns the same structure.
    """
    if args is not None and not is_ours(getattr(args, "optimizer_type", None)):
        return trainable_params
    named_parameters = getattr(network, "named_parameters", None)
    if not callable(named_parameters):
        return trainable_params
    table = list(named_parameters())
    attach = _names().attach_param_names
    if isinstance(trainable_params, tuple) and len(trainable_params) == 2:
        groups, descriptions = trainable_params
        return attach_names(groups, network), descriptions
    if isinstance(trainable_params, (list, tuple)) and trainable_params and not any(
        isinstance(g, dict) for g in trainable_params
    ):
        by_id = {id(p): n for n, p in table}
        params = list(trainable_params)
        if all(id(p) in by_id for p in params):
            return [{"params": params, "named": [by_id[id(p)] for p in params]}]
        return trainable_params
    return attach(trainable_params, table)


def __getattr__(name):
    """``hina_sdscripts.<OptimizerName>``: the zero-patch route's dotted path."""
    if name.startswith("__"):
        raise AttributeError(name)
    info = _registry().lookup(name)
    if info is None:
        raise AttributeError(f"module 'hina_sdscripts' has no optimizer {name!r}")
    return info.load()
