"""kohya-format LoRA network for Stable Diffusion 1.x / 2.x and SDXL.

The module implements the interface sd-scripts' ``train_network.py`` drives
(``--network_module networks.lora``): ``create_network``, ``create_network_from_weights`` and a
network object with ``apply_to``, ``prepare_optimizer_params``, ``save_weights`` ... . Weight
files use kohya's key layout, so they load in the usual LoRA consumers::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight   (lora_te1_/lora_te2_ for SDXL)

For an SDXL U-Net (``text_time`` conditioning) the U-Net modules carry the original block names,
as sd-scripts' SDXL LoRA files do: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.

Targets (matched by class name, so diffusers / transformers versions with other module classes
but the same names still work):

* U-Net: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside ``Transformer2DModel``.
* With ``conv_dim``: also the modules inside ``ResnetBlock2D`` / ``Downsample2D`` /
  ``Upsample2D``: kxk convs at ``conv_dim`` / ``conv_alpha``; Linear (``time_emb_proj``) and 1x1
  (``conv_shortcut``) at ``network_dim`` / ``network_alpha``, as kohya's LoRA-C3Lier does.
* Text encoder(s): ``nn.Linear`` inside ``CLIPAttention`` (transformers 5 has no separate
  ``CLIPSdpaAttention`` class any more; older names are kept for older versions) and ``CLIPMLP``.
  Names keep the classic ``text_model`` level (``lora_te_text_model_encoder_layers_0_...``)
  although transformers 5's flattened CLIPTextModel lacks it (see
  networks.names.kohya_text_encoder_view).

Param groups carry this project's ``"named"`` key: parameter names aligned with ``"params"``,
the same strings ``network.named_parameters()`` yields, so name-aware optimizers can see which
tensor is a ``lora_down`` / ``lora_up`` / conv weight.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.names import kohya_text_encoder_view, sdxl_unet_names

logger = logging.getLogger(__name__)

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
UNET_TARGET_MODULES = ["Transformer2DModel"]
UNET_TARGET_MODULES_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
TEXT_ENCODER_TARGET_MODULES = ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"]


# ----------------------------------------------------------------------------- helpers


def _opt_float(value, default=None):
    """float(value), or `default` for None / "" / "none" (network_args arrive as strings)."""
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return default
    return float(value)


def _opt_int(value, default=None):
    v = _opt_float(value, None)
    return default if v is None else int(v)


def _text_encoder_list(text_encoder) -> list:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [te for te in text_encoder if te is not None]
    return [text_encoder]


def _text_encoder_prefixes(n: int) -> list[str]:
    if n <= 1:
        return [LORA_PREFIX_TEXT_ENCODER] * n
    return [f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}" for i in range(n)]


def safetensors_data_hashes(tensors: dict) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a state dict as it will be stored by safetensors.

    Both hash the *tensor data region* of the safetensors serialisation (the bytes after the
    8-byte length and the JSON header). That region does not depend on the metadata, so the
    hashes equal those of the final file's data region although they are stored in its header:

    * model hash: sha256 hex digest of the whole data region (what sd-webui's
      additional-networks extension computes for a safetensors file);
    * legacy hash: first 8 hex digits of sha256 over the 64 KiB window at 1 MiB into the data
      region, or over the whole region when it is shorter than 1 MiB + 64 KiB.
    """
    from safetensors.torch import save as st_save

    blob = st_save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    data = memoryview(blob)[8 + header_len:]
    model_hash = hashlib.sha256(data).hexdigest()
    window = data[0x100000:0x110000] if len(data) >= 0x110000 else data
    legacy_hash = hashlib.sha256(window).hexdigest()[:8]
    return model_hash, legacy_hash


def load_state_dict_file(file: str) -> dict:
    """State dict from a .safetensors file or a torch file, on CPU."""
    if os.path.splitext(file)[1] == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def give_user_mode(path: str) -> None:
    """The permissions a plain ``open()`` would have given (0666 less the umask): a temporary file
    from mkstemp is private (0600), which would otherwise carry over to the saved model."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_state_dict_file(state_dict: dict, file: str, metadata: dict | None = None) -> None:
    """Atomically write `state_dict`: a temporary file in the same folder, then os.replace.

    ``.safetensors`` files get `metadata` (values turned into strings) plus the
    ``sshs_model_hash`` / ``sshs_legacy_hash`` of safetensors_data_hashes; other extensions are
    written with torch.save (no metadata).
    """
    file = os.fspath(file)
    directory = os.path.dirname(os.path.abspath(file))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        if os.path.splitext(file)[1] == ".safetensors":
            from safetensors.torch import save_file

            md = {str(k): str(v) for k, v in (metadata or {}).items()}
            md["sshs_model_hash"], md["sshs_legacy_hash"] = safetensors_data_hashes(state_dict)
            save_file(state_dict, tmp, md)
        else:
            torch.save(state_dict, tmp)
        give_user_mode(tmp)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- module


class LoRAModule(nn.Module):
    """out = org(x) + lora_up(lora_down(x)) * multiplier * alpha / rank."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, nn.Conv2d):
            if org_module.groups != 1:
                raise ValueError(f"{lora_name}: grouped convolutions are not supported")
            self.is_conv = True
            self.lora_down = nn.Conv2d(
                org_module.in_channels,
                self.lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                dilation=org_module.dilation,
                bias=False,
            )
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False)
        elif isinstance(org_module, nn.Linear):
            self.is_conv = False
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: unsupported module {type(org_module).__name__}")

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))

        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.org_module = [org_module]  # a list keeps it out of this module's tree
        self.org_forward = None
        self._had_instance_forward = False

    # -- patching

    def apply_to(self) -> None:
        """Route the original module's forward through this LoRA."""
        if self.org_forward is not None:
            return
        org = self.org_module[0]
        self._had_instance_forward = "forward" in org.__dict__
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Undo apply_to."""
        if self.org_forward is None:
            return
        org = self.org_module[0]
        if self._had_instance_forward:
            org.forward = self.org_forward
        else:
            org.__dict__.pop("forward", None)
        self.org_forward = None

    # -- compute

    def forward(self, x, *args, **kwargs):
        org_out = self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return org_out

        weight = self.lora_down.weight
        lx = self.lora_down(x if x.dtype == weight.dtype else x.to(weight.dtype))
        scale = self.scale
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            if self.is_conv:  # (B, r, H, W)
                shape = (lx.size(0), self.lora_dim) + (1,) * (lx.dim() - 2)
            else:  # (..., r): one mask per sample and rank
                shape = (lx.size(0),) + (1,) * (lx.dim() - 2) + (self.lora_dim,)
            mask = (torch.rand(shape, device=lx.device) > self.rank_dropout).to(lx.dtype)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)
        out = self.lora_up(lx) * (self.multiplier * scale)
        return org_out + out.to(org_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update lora_up @ lora_down * scale, shaped like the original weight."""
        down = self.lora_down.weight
        up = self.lora_up.weight
        if not self.is_conv:
            w = up @ down
        else:
            w = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        return w * self.scale

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None, dtype=None, device=None) -> None:
        """Add the update into the original module's weight."""
        org = self.org_module[0]
        m = self.multiplier if multiplier is None else multiplier
        w = org.weight
        delta = self.delta_weight().to(device=w.device, dtype=torch.float32) * m
        new = (w.float() + delta).to(dtype=dtype or w.dtype)
        if device is not None:
            new = new.to(device)
        org.weight.data = new


# ----------------------------------------------------------------------------- network


class LoRANetwork(nn.Module):
    def __init__(
        self,
        text_encoder,
        unet,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        modules_dim: dict | None = None,
        modules_alpha: dict | None = None,
    ):
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        self._modules_dim = modules_dim
        self._modules_alpha = modules_alpha or {}

        self.text_encoder_loras: list[LoRAModule] = []
        self.text_encoder_lora_groups: list[list[LoRAModule]] = []
        tes = [kohya_text_encoder_view(te) for te in _text_encoder_list(text_encoder)]
        for prefix, te in zip(_text_encoder_prefixes(len(tes)), tes):
            loras = self._create_modules(prefix, te, TEXT_ENCODER_TARGET_MODULES)
            self.text_encoder_lora_groups.append(loras)
            self.text_encoder_loras.extend(loras)

        unet_targets = list(UNET_TARGET_MODULES)
        if modules_dim is not None or conv_lora_dim:
            unet_targets += UNET_TARGET_MODULES_CONV2D_3X3
        self.unet_loras: list[LoRAModule] = (
            self._create_modules(LORA_PREFIX_UNET, unet, unet_targets, sdxl_unet_names(unet)) if unet is not None else []
        )
        logger.info(
            "LoRA: %d text encoder modules, %d U-Net modules", len(self.text_encoder_loras), len(self.unet_loras)
        )

        seen = set()
        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in seen:
                raise ValueError(f"duplicated lora name: {lora.lora_name}")
            seen.add(lora.lora_name)
            # Registered now (not only in apply_to), so names, state_dict and load_weights work
            # before the network is applied.
            self.add_module(lora.lora_name, lora)

    def _create_modules(self, prefix: str, root: nn.Module, target_classes: Iterable[str],
                        rename=None) -> list[LoRAModule]:
        """LoRA modules for the Linear / Conv2d layers inside ``target_classes``, named
        ``<prefix>_<path with _>``; ``rename`` maps a path first (SDXL: the original block names)."""
        targets = set(target_classes)
        loras: dict[str, LoRAModule] = {}
        for name, module in root.named_modules():
            if type(module).__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                is_linear = isinstance(child, nn.Linear)
                is_conv = isinstance(child, nn.Conv2d)
                if not (is_linear or is_conv) or not child_name:
                    continue
                full = f"{name}.{child_name}" if name else child_name
                lora_name = f"{prefix}.{rename(full) if rename else full}".replace(".", "_")
                if lora_name in loras:
                    continue
                if self._modules_dim is not None:  # from a weights file: exactly its modules
                    if lora_name not in self._modules_dim:
                        continue
                    dim = self._modules_dim[lora_name]
                    alpha = self._modules_alpha.get(lora_name, dim)
                elif is_linear or tuple(child.kernel_size) == (1, 1):
                    dim, alpha = self.lora_dim, self.alpha
                elif self.conv_lora_dim:
                    dim, alpha = self.conv_lora_dim, self.conv_alpha
                else:
                    continue
                if not dim:
                    continue
                loras[lora_name] = LoRAModule(
                    lora_name,
                    child,
                    self.multiplier,
                    dim,
                    alpha,
                    dropout=self.dropout,
                    rank_dropout=self.rank_dropout,
                    module_dropout=self.module_dropout,
                )
        return list(loras.values())

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # -- kohya train_network hooks

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        self.set_multiplier(1.0 if enabled else 0.0)

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Patch the target modules (bound at creation; the model arguments are for kohya's call).

        With apply_text_encoder / apply_unet False, that side's LoRA modules are dropped from the
        network (they would never receive gradients).
        """
        if not apply_text_encoder:
            for lora in self.text_encoder_loras:
                delattr(self, lora.lora_name)
            self.text_encoder_loras = []
            self.text_encoder_lora_groups = []
        if not apply_unet:
            for lora in self.unet_loras:
                delattr(self, lora.lora_name)
            self.unet_loras = []
        for lora in self.loras:
            lora.apply_to()

    def restore(self) -> None:
        """Undo apply_to on every module."""
        for lora in self.loras:
            lora.restore()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder, unet, weights_sd: dict, dtype=None, device=None) -> None:
        """Load `weights_sd` and add the updates into the original weights (no patching)."""
        by_module: dict[str, dict] = {}
        for key, value in weights_sd.items():
            name, _, rest = key.partition(".")
            if rest:
                by_module.setdefault(name, {})[rest] = value
        merged = 0
        for lora in self.loras:
            sd = by_module.get(lora.lora_name)
            if not sd:
                continue
            lora.load_state_dict(sd, strict=False)
            lora.merge_to(dtype=dtype, device=device)
            merged += 1
        logger.info("LoRA: merged %d modules", merged)

    def enable_gradient_checkpointing(self) -> None:
        pass  # nothing to checkpoint in the adapters themselves

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, *args, **kwargs) -> None:
        pass

    def get_trainable_params(self):
        return self.parameters()

    # -- optimizer groups

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """(param_groups, descriptions).

        Groups: ``{"params": [...], "named": [...], "lr": lr}``. Text encoder groups use
        `text_encoder_lr` (or `default_lr` when None); a list gives one lr per text encoder
        (one entry: all of them), described "textencoder 1", "textencoder 2". U-Net groups use
        `unet_lr` (or `default_lr`). With a LoRA+ ratio, the ``lora_up`` tensors form their own
        group at lr * ratio, described with a " plus" suffix. A group whose lr is 0 is left out;
        with lr None the "lr" key is omitted (the optimizer's default applies, LoRA+ ratios too).
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        descriptions: list[str] = []

        def assemble(loras, lr, ratio, description):
            main, plus = [], []
            for lora in loras:
                for pname, param in lora.named_parameters():
                    bucket = plus if ratio is not None and "lora_up" in pname else main
                    bucket.append((f"{lora.lora_name}.{pname}", param))
            for suffix, items, mult in (("", main, 1.0), (" plus", plus, ratio)):
                if not items:
                    continue
                group = {"params": [p for _, p in items], "named": [n for n, _ in items]}
                if lr is not None:
                    group_lr = lr * mult
                    if group_lr == 0:
                        logger.info("LoRA: lr 0, not training %s%s", description, suffix)
                        continue
                    group["lr"] = group_lr
                groups.append(group)
                descriptions.append(description + suffix)

        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        if self.text_encoder_loras:
            if isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) > 1 and len(
                self.text_encoder_lora_groups
            ) > 1:
                for i, loras in enumerate(self.text_encoder_lora_groups):
                    lr = text_encoder_lr[i] if i < len(text_encoder_lr) else None
                    assemble(loras, default_lr if lr is None else lr, te_ratio, f"textencoder {i + 1}")
            else:
                if isinstance(text_encoder_lr, (list, tuple)):
                    text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
                lr = default_lr if text_encoder_lr is None else text_encoder_lr
                assemble(self.text_encoder_loras, lr, te_ratio, "textencoder")
        if self.unet_loras:
            lr = default_lr if unet_lr is None else unet_lr
            assemble(self.unet_loras, lr, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet")
        return groups, descriptions

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    # -- regularisation

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """Scale each module so that ||lora_up @ lora_down * scale|| <= max_norm_value.

        Both factors are scaled by sqrt(ratio). Returns (keys_scaled, mean_norm, max_norm) of the
        norms after scaling, as python numbers.
        """
        keys_scaled = 0
        norms = []
        for lora in self.loras:
            w = lora.delta_weight().to(device=device, dtype=torch.float32)
            norm = float(w.norm())
            if norm > max_norm_value * (1 + 1e-6) and max_norm_value >= 0:  # tolerance: no re-scaling of rounding noise
                ratio = max_norm_value / norm
                s = math.sqrt(ratio)
                lora.lora_down.weight.mul_(s)
                lora.lora_up.weight.mul_(s)
                keys_scaled += 1
                norm = norm * ratio
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # -- files

    def load_weights(self, file: str):
        """Load a safetensors / torch file (strict=False); returns load_state_dict's result."""
        weights_sd = load_state_dict_file(file)
        info = self.load_state_dict(weights_sd, strict=False)
        logger.info("LoRA: weights loaded from %s: %s", file, info)
        return info

    def save_weights(self, file: str, dtype=None, metadata: dict | None = None) -> None:
        """Tensors moved to CPU and cast to `dtype`, written atomically (see save_state_dict_file)."""
        state = {}
        for key, value in self.state_dict().items():
            v = value.detach().to("cpu")
            if dtype is not None:
                v = v.to(dtype)
            state[key] = v.contiguous().clone()
        save_state_dict_file(state, file, metadata)


# ----------------------------------------------------------------------------- factories


def _apply_loraplus(network: LoRANetwork, kwargs: dict) -> None:
    keys = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    ratios = [_opt_float(kwargs.get(k)) for k in keys]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> LoRANetwork:
    """kohya's entry point. kwargs (network_args, strings): conv_dim, conv_alpha, rank_dropout,
    module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio."""
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = _opt_int(kwargs.pop("conv_dim", None))
    conv_alpha = _opt_float(kwargs.pop("conv_alpha", None))
    if conv_dim and conv_alpha is None:
        conv_alpha = 1.0
    rank_dropout = _opt_float(kwargs.pop("rank_dropout", None))
    module_dropout = _opt_float(kwargs.pop("module_dropout", None))
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=network_dim,
        alpha=network_alpha,
        dropout=_opt_float(neuron_dropout),
        rank_dropout=rank_dropout,
        module_dropout=module_dropout,
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
    )
    _apply_loraplus(network, kwargs)
    unknown = set(kwargs) - {"loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
    if unknown:
        logger.warning("LoRA: ignoring unsupported network_args %s", sorted(unknown))
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae,
    text_encoder,
    unet,
    weights_sd: dict | None = None,
    for_inference: bool = False,
    **kwargs,
):
    """(network, weights_sd): a network with exactly the modules, ranks and alphas of the file.

    The weights are not loaded into the network: call ``network.load_state_dict(weights_sd,
    strict=False)`` (or ``load_weights``), before or after apply_to.
    """
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            modules_alpha[name] = float(value)
        elif rest.startswith("lora_down"):
            modules_dim[name] = int(value.shape[0])
    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha
    )
    _apply_loraplus(network, kwargs)
    return network, weights_sd
