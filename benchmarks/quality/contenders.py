"""The optimizers the quality benchmark compares, and how one run of each is configured.

A :class:`Contender` is one optimizer as a user would ship it: ``optimizer_type`` (what
``--optimizer_type`` says; resolved by ``library.train_util.resolve_optimizer`` exactly as
``train_network.py`` does), ``kwargs`` (the parsed ``--optimizer_args``), the untuned ``lr``
(the constructor's default, read from its signature, or a preset's ``learning_rate``) and an lr
:class:`Schedule`. Three groups (``contenders()``):

- peers (torch, bitsandbytes, pytorch_optimizer, prodigyopt, schedulefree): tuned only;
- ours at their constructor defaults: the three main classes tuned *and* untuned, the variants
  (8-bit, C-Optim, refactored) untuned only;
- every ``configs/*.toml`` preset (found by globbing, so a new preset appears automatically):
  untuned only, with its own lr, arguments, scheduler and warmup.

:func:`resolve_run` turns (contender, task length, lr, seed) into a :class:`RunConfig`, the full
description of one run; two runs with the same :meth:`RunConfig.key` are the same computation
and are run once.

Step-length scaling (:func:`scale_lengths`): the keys in ``LENGTH_KEYS`` of the *effective*
arguments (explicit arguments over the class's signature defaults) are the optimizer's
warmup/transition lengths in steps. If a task is shorter than twice the longest of them, all of
them are multiplied by ``steps / (2 * longest)`` (rounded, at least 1), so that every phase of
the optimizer happens within the run. Arguments that a contender sets as a fraction of the run
(``run_fraction_kwargs``: schedule-free's own warmup) are not scaled.
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from library.optimizers.registry import parse_optimizer_args
from library.train_util import resolve_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")

LENGTH_KEYS = ("warmup_steps", "wd_transition_steps")


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """An lr scheduler of diffusers' ``get_scheduler`` and its warmup, read as
    ``--lr_warmup_steps`` is: ``"5%"`` or a number below 1 is a fraction of the run; a number
    of 1 or more is steps at the contender's ``reference_steps`` (a preset's
    ``max_train_steps``), scaled to the run by ``steps / reference_steps``."""
    name: str = "cosine"
    warmup: str | float = "5%"

    def warmup_steps(self, steps: int, reference_steps: int | None = None) -> int:
        if self.name == "constant":
            return 0
        text = str(self.warmup).strip()
        if text.endswith("%"):
            return max(1, round(float(text[:-1]) / 100.0 * steps))
        value = float(text)
        if 0 < value < 1:
            return max(1, round(value * steps))
        return round(value * steps / (reference_steps or steps))

    def describe(self) -> str:
        if self.name == "constant":
            return "constant"
        return f"{self.name}, warmup {self.warmup}"


COSINE_5PCT = Schedule()
CONSTANT = Schedule("constant", 0)


# ----------------------------------------------------------------------------- contender
@dataclass(frozen=True)
class Contender:
    key: str                                        # label in tables and plots
    optimizer_type: str                             # what --optimizer_type would say
    lr: float                                       # the untuned lr (constructor default / preset lr)
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # --optimizer_args, parsed
    source: str = ""                                # where lr and kwargs come from
    ours: bool = False
    tune: bool = True                               # gets an lr search, then runs at the best lr
    untuned: bool = False                           # runs as shipped (lr, kwargs, schedule)
    schedule: Schedule = COSINE_5PCT
    reference_steps: int | None = None              # a preset's max_train_steps
    quick: bool = False                             # member of the --quick set
    run_fraction_kwargs: Mapping[str, float] = field(default_factory=dict)  # kwargs = round(fraction * steps)

    def optimizer_class(self):
        return resolve_optimizer(self.optimizer_type, dict(self.kwargs))[0]

    def describe(self) -> dict:
        return {"optimizer_type": self.optimizer_type, "class": class_path(self.optimizer_class()),
                "untuned_lr": self.lr, "kwargs": jsonable(dict(self.kwargs)), "source": self.source,
                "ours": self.ours, "tune": self.tune, "untuned": self.untuned,
                "schedule": {"name": self.schedule.name, "warmup": self.schedule.warmup},
                "reference_steps": self.reference_steps,
                "run_fraction_kwargs": dict(self.run_fraction_kwargs)}


def class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def signature_defaults(cls) -> dict:
    """Keyword defaults of the constructor (the Automagic classes build their signature from
    their defaults dict, so inspect.signature sees those too)."""
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}


def default_lr(optimizer_type: str) -> float:
    """The constructor's default ``lr`` (never hard-coded here)."""
    return float(signature_defaults(resolve_optimizer(optimizer_type, {})[0])["lr"])


def effective_kwargs(cls, explicit: Mapping) -> dict:
    """Explicit arguments over the signature defaults, without ``lr``."""
    out = {**signature_defaults(cls), **explicit}
    out.pop("lr", None)
    out.pop("params", None)
    return out


# ----------------------------------------------------------------------------- scaling rule
def scale_lengths(lengths: Mapping[str, int], steps: int) -> tuple[dict, float]:
    """The step-length rule: ``(scaled lengths, factor)``.

    ``lengths`` are an optimizer's warmup/transition lengths in steps. If ``steps`` is shorter
    than twice the longest, each is multiplied by ``f = steps / (2 * longest)``, rounded, at
    least 1; otherwise they are returned unchanged with factor 1. Non-positive or non-integer
    values are not lengths and pass through unchanged.
    """
    real = {k: v for k, v in lengths.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
    longest = max(real.values(), default=0)
    if not real or steps >= 2 * longest:
        return dict(lengths), 1.0
    factor = steps / (2 * longest)
    return {**lengths, **{k: max(1, round(v * factor)) for k, v in real.items()}}, factor


# ----------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run."""
    task: str
    steps: int
    optimizer_type: str
    class_path: str
    lr: float
    kwargs: tuple               # (key, value) pairs passed to the constructor
    effective: str              # canonical JSON of the effective arguments (after scaling)
    scheduler: str
    warmup_steps: int
    seed: int

    def key(self) -> str:
        """Runs with equal keys are the same computation (the dedupe key)."""
        return json.dumps([self.task, self.steps, self.class_path, self.effective, repr(float(self.lr)),
                           self.scheduler, self.warmup_steps, self.seed])

    def describe(self) -> dict:
        return {"task": self.task, "steps": self.steps, "optimizer_type": self.optimizer_type,
                "class": self.class_path, "lr": self.lr, "kwargs": jsonable(dict(self.kwargs)),
                "scheduler": self.scheduler, "warmup_steps": self.warmup_steps, "seed": self.seed}


@dataclass(frozen=True)
class Lengths:
    """What the scaling rule did for one contender on one task."""
    original: Mapping[str, int]
    scaled: Mapping[str, int]
    factor: float

    def describe(self) -> dict:
        return {"original": dict(self.original), "scaled": dict(self.scaled), "factor": self.factor}


def _explicit_kwargs(contender: Contender, steps: int, overrides: Mapping | None):
    """(class, explicit kwargs before scaling, effective kwargs) of one run."""
    cls, explicit, _info = resolve_optimizer(contender.optimizer_type, dict(contender.kwargs))
    explicit.update(overrides or {})
    explicit.update({k: max(1, round(f * steps)) for k, f in contender.run_fraction_kwargs.items()})
    return cls, explicit, effective_kwargs(cls, explicit)


def lengths_for(contender: Contender, steps: int, overrides: Mapping | None = None) -> Lengths:
    _cls, _explicit, effective = _explicit_kwargs(contender, steps, overrides)
    original = {k: effective[k] for k in LENGTH_KEYS
                if k in effective and k not in contender.run_fraction_kwargs and effective[k] is not None}
    scaled, factor = scale_lengths(original, steps)
    return Lengths(original, scaled, factor)


def resolve_run(contender: Contender, task: str, steps: int, lr: float, seed: int,
                overrides: Mapping | None = None) -> RunConfig:
    """The run of `contender` at `lr` on `seed`, `overrides` (an ablation's changes) applied
    to its arguments, lengths scaled to `steps`."""
    cls, explicit, effective = _explicit_kwargs(contender, steps, overrides)
    lengths = lengths_for(contender, steps, overrides)
    changed = {k: v for k, v in lengths.scaled.items() if lengths.original.get(k) != v}
    explicit.update(changed)
    effective.update(changed)
    return RunConfig(task=task, steps=steps, optimizer_type=contender.optimizer_type, class_path=class_path(cls),
                     lr=float(lr), kwargs=tuple(sorted(explicit.items())), effective=_canonical(effective),
                     scheduler=contender.schedule.name,
                     warmup_steps=contender.schedule.warmup_steps(steps, contender.reference_steps), seed=seed)


def build_optimizer(cfg: RunConfig, groups, named):
    """The optimizer of one run, built as ``train_network.py`` builds it: kohya-style param
    groups (with ``named``), ``set_param_names`` for name-aware classes, ``train()`` mode for
    schedule-free ones."""
    cls, kwargs, _info = resolve_optimizer(cfg.optimizer_type, dict(cfg.kwargs))
    groups = [{**g, "params": list(g["params"]), "lr": cfg.lr} for g in groups]
    opt = cls(groups, lr=cfg.lr, **kwargs)
    if hasattr(opt, "set_param_names"):
        opt.set_param_names(named)
    if callable(getattr(opt, "train", None)):
        opt.train()
    return opt


def jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _canonical(kwargs: Mapping) -> str:
    return json.dumps(jsonable(kwargs), sort_keys=True)


# ----------------------------------------------------------------------------- the list
@dataclass(frozen=True)
class Preset:
    """The [optimizer] and [training] tables of one configs/*.toml file."""
    name: str
    optimizer_type: str
    learning_rate: float
    optimizer_args: Mapping[str, Any]
    schedule: Schedule
    max_train_steps: int | None


def load_preset(path: str) -> Preset:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    opt, training = cfg["optimizer"], cfg.get("training", {})
    return Preset(name=os.path.splitext(os.path.basename(path))[0], optimizer_type=opt["optimizer_type"],
                  learning_rate=float(opt["learning_rate"]),
                  optimizer_args=MappingProxyType(parse_optimizer_args(opt.get("optimizer_args", []))),
                  schedule=Schedule(opt.get("lr_scheduler", "constant"), opt.get("lr_warmup_steps", 0)),
                  max_train_steps=training.get("max_train_steps"))


def preset_contender(p: Preset) -> Contender:
    return Contender(f"preset {p.name}", p.optimizer_type, p.learning_rate, p.optimizer_args,
                     f"configs/{p.name}.toml", ours=True, tune=False, untuned=True, schedule=p.schedule,
                     reference_steps=p.max_train_steps)


def presets(config_dir: str = CONFIGS) -> list[Preset]:
    return [load_preset(path) for path in sorted(glob.glob(os.path.join(config_dir, "*.toml")))]


@dataclass(frozen=True)
class Ours:
    """One of our classes at its constructor defaults."""
    key: str
    optimizer_type: str
    tune: bool
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    quick: bool = False

    def contender(self) -> Contender:
        return Contender(self.key, self.optimizer_type, default_lr(self.optimizer_type), self.kwargs,
                         "constructor defaults" + "".join(f" + {k}={v}" for k, v in self.kwargs.items()),
                         ours=True, tune=self.tune, untuned=True, quick=self.quick)


OURS = (
    Ours("AdaptiveHinaAdamW", "AdaptiveHinaAdamW", tune=True, quick=True),
    Ours("HinaAdamWOptimizer", "HinaAdamWOptimizer", tune=True, quick=True),
    Ours("Automagic_CameAMP", "Automagic_CameAMP", tune=True, quick=True),
    Ours("AdaptiveHinaAdamW (optim_bits=8)", "AdaptiveHinaAdamW", tune=False, kwargs=MappingProxyType({"optim_bits": 8})),
    Ours("Automagic_CameAMP8bit", "Automagic_CameAMP8bit", tune=False),
    Ours("Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim", tune=False),
    Ours("Automagic_CameAMP_COptim8bit", "Automagic_CameAMP_COptim8bit", tune=False),
    Ours("RefactoredAutomagicCameAMP", "RefactoredAutomagicCameAMP", tune=False),
)

PEERS = (
    Contender("AdamW (fused)", "AdamW", 1e-3, MappingProxyType({"fused": True}), "torch.optim.AdamW default lr",
              quick=True),
    Contender("bnb AdamW8bit", "AdamW8bit", 1e-3, source="bitsandbytes default lr"),
    Contender("CAME (pytorch_optimizer)", "pytorch_optimizer.CAME", 2e-4, source="pytorch_optimizer default lr"),
    Contender("ADOPT (pytorch_optimizer)", "pytorch_optimizer.ADOPT", 1e-3, source="pytorch_optimizer default lr"),
    Contender("Prodigy (prodigyopt)", "Prodigy", 1.0, source="prodigyopt default lr (d-adaptation)", quick=True),
    Contender("AdamWScheduleFree", "AdamWScheduleFree", 2.5e-3, source="schedulefree default lr; its warmup_steps = "
              "5% of the run", schedule=CONSTANT, run_fraction_kwargs=MappingProxyType({"warmup_steps": 0.05})),
)
BASELINE = "AdamW (fused)"


def contenders(config_dir: str = CONFIGS) -> list[Contender]:
    """Every contender: peers, ours at constructor defaults, then the presets."""
    return [*PEERS, *(o.contender() for o in OURS), *(preset_contender(p) for p in presets(config_dir))]
