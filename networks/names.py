"""Parameter names for optimizer param groups, and kohya-standard text encoder module paths.

This project's optimizers may read a ``"named"`` list in each param group: the parameter
names aligned one to one with ``"params"``. `attach_param_names` adds it to groups built by
code that does not know about it (LyCORIS' ``prepare_optimizer_params``, for instance)::

    groups, descriptions = network.prepare_optimizer_params(te_lr, unet_lr, lr)
    groups, descriptions = attach_param_names((groups, descriptions), network.named_parameters())
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def _name_table(named_parameters: Iterable) -> dict[int, str]:
    table: dict[int, str] = {}
    for name, param in named_parameters:
        table.setdefault(id(param), name)  # first name wins for shared tensors
    return table


def _attach(group: dict, table: dict[int, str]) -> dict:
    if "named" in group:
        return group
    params = group.get("params")
    if params is None:
        return group
    if isinstance(params, torch.Tensor):
        params = [params]
    else:
        params = list(params)  # dict_values / generators: materialise once
    names = []
    for p in params:
        name = table.get(id(p))
        if name is None:
            return group  # some tensor is unknown: leave the group as it was
        names.append(name)
    group["params"] = params
    group["named"] = names
    return group


def attach_param_names(param_groups, named_parameters_iterable):
    """Add ``"named"`` (names aligned with ``"params"``) to each param group, by tensor identity.

    `param_groups` may be a list of group dicts, a single group dict, or the
    ``(groups, descriptions)`` tuple kohya networks return; the same structure comes back.
    Groups are updated in place: ``"params"`` becomes a list (so it can be walked again, e.g.
    when LyCORIS gives a ``dict_values``) and ``"named"`` is added. A group that already has
    ``"named"``, or holds a tensor absent from `named_parameters_iterable`, is left untouched.
    A bare list of tensors (no group dicts) is returned unchanged. Runs in O(#parameters).
    """
    if isinstance(param_groups, tuple) and len(param_groups) == 2 and isinstance(param_groups[0], (list, tuple)):
        groups, descriptions = param_groups
        return attach_param_names(groups, named_parameters_iterable), descriptions
    table = _name_table(named_parameters_iterable)
    if isinstance(param_groups, dict):
        return _attach(param_groups, table)
    groups = param_groups if isinstance(param_groups, list) else list(param_groups)
    for group in groups:
        if isinstance(group, dict):
            _attach(group, table)
    return groups


class _TextModelView(nn.Module):
    """Holds a flattened CLIPTextModel under the classic ``text_model`` attribute."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


def kohya_text_encoder_view(text_encoder):
    """A module whose named_modules() give the classic kohya paths of `text_encoder`.

    transformers 5 flattened ``CLIPTextModel``: its layers are ``encoder.layers.N`` on the model
    itself, where transformers 4 (and every SD LoRA file) has ``text_model.encoder.layers.N``.
    Module names built from the flattened paths (``lora_te_encoder_layers_0_...``) would not
    match LoRA files made elsewhere, so such a model is wrapped in a view adding the
    ``text_model`` level back. Anything else (transformers 4 models,
    ``CLIPTextModelWithProjection``, which kept ``text_model``) is returned as is. Lists and
    tuples are mapped element-wise; None stays None.
    """
    if text_encoder is None:
        return None
    if isinstance(text_encoder, (list, tuple)):
        return type(text_encoder)(kohya_text_encoder_view(te) for te in text_encoder)
    if isinstance(text_encoder, _TextModelView) or hasattr(text_encoder, "text_model"):
        return text_encoder
    if (
        type(text_encoder).__name__.startswith("CLIPTextModel")
        and hasattr(text_encoder, "encoder")
        and hasattr(text_encoder, "embeddings")
    ):
        return _TextModelView(text_encoder)
    return text_encoder
