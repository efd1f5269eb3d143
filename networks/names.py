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


# ----------------------------------------------------------------- the original (LDM) U-Net names
def unet_ldm_prefixes(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config, most specific first."""
    layers, levels = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(levels):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.")]
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.")]
        if i < levels - 1:
            last = (layers + 1) * i + layers
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}."))
    return pairs


UNET_RESNET_PARTS = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                      ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def ldm_unet_path(path: str, prefixes) -> str | None:
    """The original (LDM) name of a diffusers U-Net weight or module path, e.g.
    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL's layout), with a
    resnet's parts renamed (``norm1`` -> ``in_layers.0`` ...); None when it has none."""
    key = path + "."
    match = next(((new, old) for new, old in prefixes if key.startswith(new)), None)
    if match is None:
        return None
    new, old = match
    tail = key[len(new):]
    if ".resnets." in new:
        tail = next((o + tail[len(n):] for n, o in UNET_RESNET_PARTS if tail.startswith(n)), tail)
    return (old + tail)[:-1]


def sdxl_unet_names(unet):
    """For an SDXL U-Net (``text_time`` conditioning): a function giving a module path its LDM name,
    the names kohya's SDXL LoRA files use (``lora_unet_input_blocks_4_1_...``); None otherwise."""
    config = getattr(unet, "config", None)
    if config is None or getattr(config, "addition_embed_type", None) != "text_time":
        return None
    prefixes = unet_ldm_prefixes(dict(config))
    return lambda path: ldm_unet_path(path, prefixes) or path
