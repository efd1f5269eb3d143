"""The optimizers the quality benchmark compares, each with its documented starting point.

Every contender is built the way ``train_network.py`` builds an optimizer: the class comes from
``library.train_util.resolve_optimizer`` (our registry, kohya's built-in names such as
``AdamW8bit``, ``Prodigy`` and ``AdamWScheduleFree``, or a dotted ``module.Class`` path), it
receives kohya-style param groups carrying the ``named`` key, and name-aware optimizers also
get ``set_param_names``.

``lr`` is the documented default learning rate (constructor default, or the preset's
``learning_rate`` for the ``configs/*.toml`` contenders) and is the centre of the grid; the grid
multiplies it by ``grid``. Nothing else is tuned.

lr-mask optimizers (AdaptiveHinaAdamW, the Automagic family) cap the per-element lr at
``max_lr`` (AdaptiveHinaAdamW silently, Automagic_CameAMP by refusing lr > max_lr). A grid point
above the documented ``max_lr`` therefore also sets ``max_lr = lr`` (the smallest change that
makes that lr take effect); every other argument keeps its documented value. The exact keyword
arguments of every run are written to the results.
"""
from __future__ import annotations

import inspect
import os
import tomllib
from dataclasses import dataclass, field

from library.optimizers.registry import parse_optimizer_args
from library.train_util import resolve_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")

DEFAULT_GRID = (1 / 3, 1.0, 3.0, 10.0)
PRODIGY_GRID = (0.5, 1.0)


@dataclass(frozen=True)
class Contender:
    key: str                 # label in tables and plots
    optimizer_type: str      # what --optimizer_type would say
    lr: float                # documented default / preset lr: the grid centre
    kwargs: dict = field(default_factory=dict)  # --optimizer_args (parsed)
    source: str = ""         # where lr and kwargs come from
    ours: bool = False
    grid: tuple = DEFAULT_GRID
    schedule: str = "cosine"  # "cosine": diffusers cosine with 5% warmup; "constant": schedule-free
    quick: bool = False       # part of the --quick set

    def lrs(self) -> list[float]:
        return [float(f"{self.lr * g:.3g}") for g in self.grid]

    def kwargs_for(self, lr: float, steps: int) -> dict:
        """Keyword arguments of the optimizer for one run at `lr` (see the module docstring)."""
        kw = dict(self.kwargs)
        if self.schedule == "constant" and "ScheduleFree" in self.optimizer_type:
            kw.setdefault("warmup_steps", max(1, round(0.05 * steps)))
        cls = self.resolve()[0]
        sig = inspect.signature(cls)
        if "max_lr" in sig.parameters and kw.get("use_lr_mask", True):
            max_lr = kw.get("max_lr", sig.parameters["max_lr"].default)
            if max_lr is not None and lr > max_lr:
                kw["max_lr"] = lr
        return kw

    def resolve(self, kwargs: dict | None = None):
        return resolve_optimizer(self.optimizer_type, dict(self.kwargs if kwargs is None else kwargs))

    def build(self, groups, named, lr: float, steps: int):
        """(optimizer, kwargs used). `groups`: param groups with "params" and "named"."""
        kw = self.kwargs_for(lr, steps)
        cls, kw, _info = resolve_optimizer(self.optimizer_type, kw)
        groups = [{**g, "params": list(g["params"]), "lr": lr} for g in groups]
        opt = cls(groups, lr=lr, **kw)
        if hasattr(opt, "set_param_names"):
            opt.set_param_names(named)
        if callable(getattr(opt, "train", None)):
            opt.train()  # schedule-free: training mode (as library.train_util.get_optimizer does)
        return opt, kw


def preset(file: str) -> tuple[str, float, dict]:
    """(optimizer_type, learning_rate, parsed optimizer_args) of a configs/*.toml preset."""
    with open(os.path.join(CONFIGS, file), "rb") as f:
        cfg = tomllib.load(f)
    o = cfg["optimizer"]
    return o["optimizer_type"], float(o["learning_rate"]), parse_optimizer_args(o.get("optimizer_args", []))


def contenders() -> list[Contender]:
    out = [
        Contender("AdamW (fused)", "AdamW", 1e-3, {"fused": True}, "torch.optim.AdamW default lr", quick=True),
        Contender("AdaptiveHinaAdamW", "AdaptiveHinaAdamW", 1e-3, {}, "constructor defaults (docs/optimizers.md §4)",
                  ours=True, quick=True),
    ]
    t, lr, kw = preset("adaptive_hina_general.toml")
    out.append(Contender("AdaptiveHinaAdamW (general preset)", t, lr, kw, "configs/adaptive_hina_general.toml", ours=True))
    out.append(Contender("AdaptiveHinaAdamW (optim_bits=8)", "AdaptiveHinaAdamW", 1e-3, {"optim_bits": 8},
                         "constructor defaults + optim_bits=8", ours=True))
    out.append(Contender("HinaAdamWOptimizer", "HinaAdamWOptimizer", 1e-3, {}, "constructor defaults (docs/optimizers.md §5)",
                         ours=True, quick=True))
    for key, file, quick in (("Automagic_CameAMP", "automagic_cameamp.toml", True),
                             ("Automagic_CameAMP8bit", "automagic_cameamp_8bit.toml", False),
                             ("Automagic_CameAMP_COptim", "automagic_cameamp_coptim.toml", False)):
        t, lr, kw = preset(file)
        out.append(Contender(key, t, lr, kw, f"configs/{file} (constructor default lr is 1e-6)", ours=True, quick=quick))
    out += [
        Contender("bnb AdamW8bit", "AdamW8bit", 1e-3, {}, "bitsandbytes default lr"),
        Contender("CAME (pytorch_optimizer)", "pytorch_optimizer.CAME", 2e-4, {}, "pytorch_optimizer default lr"),
        Contender("ADOPT (pytorch_optimizer)", "pytorch_optimizer.ADOPT", 1e-3, {}, "pytorch_optimizer default lr"),
        Contender("Prodigy (pytorch_optimizer)", "pytorch_optimizer.Prodigy", 1.0, {}, "lr=1 (d-adaptation)",
                  grid=PRODIGY_GRID),
        Contender("Prodigy (prodigyopt)", "Prodigy", 1.0, {}, "lr=1 (d-adaptation)", grid=PRODIGY_GRID, quick=True),
        Contender("AdamWScheduleFree", "AdamWScheduleFree", 2.5e-3, {}, "schedulefree default lr; warmup_steps=5% of steps",
                  schedule="constant"),
    ]
    return out
