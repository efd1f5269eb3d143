"""sd-scripts' sample-prompt files and sampler names: parsing, validation, the diffusers scheduler
for a sampler. Used before any model loads (prompt files are checked up front) and by
:mod:`library.trainer.samples`.

A prompt file is ``.txt`` (one prompt per line, ``#`` comments), ``.toml`` (``[prompt]`` with a
``[[prompt.subset]]`` list, each subset's keys over the shared ones) or ``.json`` (a list of lines
or dicts). A line is ``text --n negative --w 512 --h 768 --s 30 --l 7.5 --d 42 --ss euler_a``.
"""
from __future__ import annotations

import json
import os
import re

from .errors import UserError

SAMPLERS = {  # sd-scripts' names -> diffusers scheduler class name (and extra config)
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
SAMPLER_NAMES = sorted(SAMPLERS) + sorted(f"k_{n}" for n in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"))
_FIELDS = [("w", "width", int), ("h", "height", int), ("d", "seed", int), ("s", "sample_steps", int),
           ("l", "scale", float), ("n", "negative_prompt", str), ("ss", "sample_sampler", str)]


def parse_prompt_line(line: str) -> dict:
    """``text --n neg --w 512 ...`` -> ``{"prompt": "text", "negative_prompt": "neg", "width": 512, ...}``."""
    parts = line.split(" --")
    out = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        for flag, key, kind in _FIELDS:
            m = re.match(rf"{flag} (.+)", part.strip(), re.IGNORECASE)
            if m:
                try:
                    out[key] = kind(m.group(1).strip())
                except ValueError:
                    raise UserError(f"--sample_prompts: {part.strip()!r} in {line!r} is not a valid --{flag}") from None
                break
    if "sample_steps" in out:
        out["sample_steps"] = max(1, min(1000, out["sample_steps"]))
    return out


def load_prompts(path: str) -> list[dict]:
    """Every prompt of a ``.txt`` / ``.toml`` / ``.json`` prompt file as a dict with its index."""
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts {path!r} does not exist")
    try:
        prompts = _read_prompt_file(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--sample_prompts {path!r} cannot be read: {e}") from None
    out = []
    for i, p in enumerate(prompts):
        p = parse_prompt_line(p) if isinstance(p, str) else dict(p)
        if not isinstance(p.get("prompt"), str):
            raise UserError(f"--sample_prompts {path!r}: prompt {i + 1} has no text")
        sampler = p.get("sample_sampler")
        if sampler is not None and sampler.lower() not in SAMPLER_NAMES:
            raise UserError(f"--sample_prompts {path!r}: prompt {i + 1} asks for sampler {sampler!r}; "
                            f"known: {', '.join(SAMPLER_NAMES)}")
        p["enum"] = i
        out.append(p)
    if not out:
        raise UserError(f"--sample_prompts {path!r} holds no prompt")
    return out


def _read_prompt_file(path: str) -> list:
    if path.endswith(".toml"):
        from .config_util import load_toml

        data = load_toml(path)["prompt"]
        shared = {k: v for k, v in data.items() if k != "subset"}
        return [{**shared, **subset} for subset in data["subset"]]
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def sampler_scheduler(name: str, train_scheduler, v_parameterization: bool):
    """The diffusers scheduler for an sd-scripts sampler name, on the training noise schedule."""
    import diffusers

    cls_name, extra = SAMPLERS[name.lower().removeprefix("k_")]
    config = {**dict(train_scheduler.config), **extra, "prediction_type": "v_prediction" if v_parameterization else "epsilon"}
    return getattr(diffusers, cls_name).from_config(config)
