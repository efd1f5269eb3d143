"""Technique tables of the ablation study: the one place to edit when an optimizer changes.

A :class:`Technique` names the constructor arguments that switch one technique ``off`` and
``on``. A value may be a function of the optimizer's effective default arguments (see
``FIRST_BETA``). From a table and the contender's effective defaults:

- *plain* config: every technique's ``off`` merged (for AdaptiveHinaAdamW this is AdamW);
- *leave-one-out*: the defaults with one technique's ``off`` applied, for every technique that
  is on by default (its effective default differs from ``off``);
- *add-one-in*: the plain config with one technique's ``on`` applied, for every technique.

Every ablation run uses the contender's tuned lr on that task (``protocol.py``), its schedule
and its scaled warmup/transition lengths; the reference of leave-one-out is the default config
(the contender's tuned report runs), the reference of add-one-in is the plain config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

LEAVE_ONE_OUT = "leave_one_out"
ADD_ONE_IN = "add_one_in"
MODES = (LEAVE_ONE_OUT, ADD_ONE_IN)


@dataclass(frozen=True)
class Technique:
    name: str
    off: Mapping[str, Any]
    on: Mapping[str, Any]


def _flag(name: str, arg: str) -> Technique:
    return Technique(name, {arg: False}, {arg: True})


def FIRST_BETA(defaults: Mapping) -> float:  # noqa: N802 - reads like a constant in the tables
    """betas[0] of the effective defaults: momentum decay off means beta1 never decays."""
    return defaults["betas"][0]


TECHNIQUES: dict[str, tuple[Technique, ...]] = {
    "AdaptiveHinaAdamW": (
        _flag("AGR", "use_agr"),
        _flag("OrthoGrad", "use_orthogonal_grad"),
        _flag("ADOPT", "use_adopt_stability"),
        _flag("TAM", "use_tam"),
        _flag("Grams", "use_grams"),
        _flag("Cautious", "use_cautious"),
        _flag("lr mask", "use_lr_mask"),
        _flag("hypergradient lr scale", "use_hypergrad"),
        _flag("SPD", "use_spd"),
        _flag("dynamic weight decay", "dynamic_weight_decay"),
        _flag("importance adaptation", "use_dynamic_adaptation"),
        Technique("LoRA+ ratio", {"lora_plus_ratio": 1.0}, {"lora_plus_ratio": 16.0}),
        Technique("ALLoRA", {"allora_eta": None}, {"allora_eta": 1.0}),
    ),
    "Automagic_CameAMP": (
        _flag("AGR", "use_agr"),
        _flag("OrthoGrad", "use_orthograd"),
        _flag("TAM", "use_tam"),
        _flag("Grams", "use_grams"),
        _flag("AdaBelief residual", "use_adabelief"),
        _flag("lr mask", "use_lr_mask"),
        _flag("AdaDecay", "adaptive_weight_decay"),
        Technique("ALLoRA", {"eta": None}, {"eta": 2.0}),
        _flag("bias correction", "came_bias_correction"),
        Technique("momentum decay", {"beta1_min": FIRST_BETA}, {"beta1_min": 0.4}),
    ),
}


def resolve_values(values: Mapping[str, Any], defaults: Mapping) -> dict:
    """`values` with every function replaced by its value at `defaults`."""
    return {k: (v(defaults) if callable(v) else v) for k, v in values.items()}


def _same(a, b) -> bool:
    norm = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
    return norm(a) == norm(b)


def on_by_default(tech: Technique, defaults: Mapping) -> bool:
    off = resolve_values(tech.off, defaults)
    return any(not _same(defaults.get(k), v) for k, v in off.items())


def plain_overrides(techniques, defaults: Mapping) -> dict:
    out = {}
    for tech in techniques:
        out.update(resolve_values(tech.off, defaults))
    return out


@dataclass(frozen=True)
class AblationConfig:
    mode: str                     # LEAVE_ONE_OUT or ADD_ONE_IN
    technique: str
    overrides: Mapping[str, Any]  # applied to the contender's arguments


def ablation_configs(techniques, defaults: Mapping, modes=MODES) -> list[AblationConfig]:
    """Leave-one-out configs (techniques on by default), then add-one-in configs (all)."""
    out = []
    if LEAVE_ONE_OUT in modes:
        out += [AblationConfig(LEAVE_ONE_OUT, t.name, resolve_values(t.off, defaults))
                for t in techniques if on_by_default(t, defaults)]
    if ADD_ONE_IN in modes:
        plain = plain_overrides(techniques, defaults)
        out += [AblationConfig(ADD_ONE_IN, t.name, {**plain, **resolve_values(t.on, defaults)}) for t in techniques]
    return out
