"""LoKr (and the other LyCORIS algorithms) through lycoris-lora, with named param groups.

``--network_module networks.lokr`` behaves like ``--network_module lycoris.kohya`` with
``algo=lokr`` as the default (``--network_args algo=loha`` etc. still select another
algorithm), plus these changes:

* ``prepare_optimizer_params`` returns groups that also carry ``"named"``: the LyCORIS
  parameter names aligned with ``"params"`` (``lora_unet_..._to_q.lokr_w1``, ``..lokr_w2_a``),
  the same strings ``network.named_parameters()`` gives once the network is applied;
* text encoder module names keep the classic ``text_model`` level under transformers 5
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), so files stay compatible with
  LyCORIS / kohya files made with transformers 4 (networks.names.kohya_text_encoder_view);
* ``apply_to`` is idempotent (LyCORIS' own would wrap its wrappers on a second call);
* ``save_weights`` is atomic (temporary file in the same folder, then os.replace);
* boolean network_args given as strings are parsed (lycoris 4.1.3 passes ``decompose_both``
  through unparsed, so ``decompose_both=False`` from the command line would switch it on);
* the default preset ("full", or none given) is replaced by "full-sd", which targets the same
  modules on an SD U-Net but avoids lycoris 4.1.3's duplicate ``time_embedding`` modules that
  make "full" fail on diffusers' UNet2DConditionModel (see _register_sd_full_preset).

The returned object is LyCORIS' own ``LycorisNetworkKohya``, re-classed to the subclass below.
"""
from __future__ import annotations

import os
import tempfile

from lycoris.kohya import LycorisNetworkKohya

from networks.lora import give_user_mode
from networks.names import attach_param_names, kohya_text_encoder_view

_BOOL_ARGS = ("decompose_both",)
SD_FULL_PRESET = "full-sd"


def _register_sd_full_preset() -> str:
    """Register (once) LyCORIS' "full" preset minus the ``TimestepEmbedding`` module class.

    lycoris-lora 4.1.3's "full" preset targets the class ``TimestepEmbedding`` (for Anima) *and*
    the names ``time_embedding.linear_1/2``; on a diffusers SD U-Net, whose ``time_embedding`` is
    a TimestepEmbedding, both rules build ``lora_unet_time_embedding_linear_1`` and the network
    constructor fails with "duplicated lora name". Without the class the same modules are
    targeted once. The preset is added to lycoris' PRESET table (a new key; nothing existing
    changes) because create_network only accepts a table name or a file path.
    """
    from lycoris.config import PRESET

    if SD_FULL_PRESET not in PRESET:
        preset = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESET["full"].items()}
        preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
        PRESET[SD_FULL_PRESET] = preset
    return SD_FULL_PRESET


def _str_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "none", "")
    return bool(value)


class NamedLycorisNetworkKohya(LycorisNetworkKohya):
    """LycorisNetworkKohya whose param groups carry parameter names."""

    def named_lora_parameters(self):
        """(name, tensor) of every LyCORIS parameter, applied to the model or not yet."""
        seen = set()
        for name, param in self.named_parameters():
            seen.add(id(param))
            yield name, param
        for lora in list(self.text_encoder_loras) + list(self.unet_loras):
            for pname, param in lora.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{lora.lora_name}.{pname}", param

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=1e-4, learning_rate=None):
        groups, descriptions = super().prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate)
        return attach_param_names((groups, descriptions), self.named_lora_parameters())

    def apply_to(self, text_encoder, unet, apply_text_encoder=None, apply_unet=None):
        """LyCORIS' apply_to, once: a second call would wrap the wrapped forwards (recursion)."""
        if getattr(self, "_named_applied", False):
            return
        super().apply_to(text_encoder, unet, apply_text_encoder, apply_unet)
        self._named_applied = True

    def save_weights(self, file, dtype, metadata):
        """LyCORIS' save_weights, made atomic: temporary file in the same folder + os.replace."""
        file = os.fspath(file)
        directory = os.path.dirname(os.path.abspath(file))
        os.makedirs(directory, exist_ok=True)
        ext = os.path.splitext(file)[1]
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.", suffix=f".tmp{ext}", dir=directory)
        os.close(fd)
        try:
            super().save_weights(tmp, dtype, dict(metadata) if metadata else metadata)
            give_user_mode(tmp)
            os.replace(tmp, file)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)


def _rebrand(network):
    network.__class__ = NamedLycorisNetworkKohya
    return network


def create_network(
    multiplier,
    network_dim,
    network_alpha,
    vae,
    text_encoder,
    unet,
    neuron_dropout=None,
    **kwargs,
):
    """lycoris.kohya.create_network with algo "lokr" unless network_args set another algo.

    kwargs are LyCORIS network_args (strings as kohya passes them): algo, factor,
    decompose_both, conv_dim, conv_alpha, preset, dropout, rank_dropout, module_dropout,
    use_tucker, use_scalar, full_matrix, loraplus_* ... . `neuron_dropout` maps to LyCORIS'
    ``dropout`` unless that is given. LyCORIS' unmatched-target warnings are off by default
    (``warn_on_unmatched=True`` turns them on).
    """
    from lycoris import kohya as lycoris_kohya

    kwargs = dict(kwargs)
    if not kwargs.get("algo"):
        kwargs["algo"] = "lokr"
    for key in _BOOL_ARGS:
        if key in kwargs:
            kwargs[key] = _str_bool(kwargs[key])
    if kwargs.get("preset") in (None, "", "full"):
        kwargs["preset"] = _register_sd_full_preset()
    if neuron_dropout is not None and kwargs.get("dropout") is None:
        kwargs["dropout"] = neuron_dropout
    kwargs["warn_on_unmatched"] = _str_bool(kwargs.get("warn_on_unmatched", False))
    network = lycoris_kohya.create_network(
        multiplier,
        network_dim,
        network_alpha,
        vae,
        kohya_text_encoder_view(text_encoder),
        unet,
        **kwargs,
    )
    return _rebrand(network)


def _load_weights_file(file):
    if os.path.splitext(file)[1] == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    import torch

    return torch.load(file, map_location="cpu", weights_only=True)


def _lokr_factor_for(in_dim, out_dim, in_shape, out_shape):
    """A LyCORIS `factor` whose factorization reproduces the stored (in_m, in_n) / (out_l, out_k)."""
    from lycoris.functional import factorization

    out_sorted = tuple(sorted(out_shape))
    candidates = [-1] + sorted(set(in_shape) | set(out_shape)) + list(range(1, max(in_dim, out_dim) + 1))
    for f in candidates:
        if factorization(in_dim, f) == tuple(in_shape) and factorization(out_dim, f) == out_sorted:
            return f
    return None


def _rebuild_lokr(lora_name, org_module, weights):
    """LokrModule with the exact tensor shapes of `weights` (LyCORIS' extract_state_dict order).

    lycoris-lora 4.1.3 infers LoKr's factor from the tensors after multiplying the kernel size
    into the input dimension of conv layers, which picks a wrong factor for some shapes (the tiny
    model's 4-channel conv_in / conv_out, for one) and then fails copying the weights, or, where
    the copy broadcasts, could load wrong ones; with Tucker conv modules it reads the rank from the
    wrong axis of ``lokr_w2_a`` and fails. The factorisation is fully determined by the tensor
    shapes and the original layer, so it is recovered here instead.
    """
    import torch
    from lycoris.modules.lokr import LokrModule

    w1, w1a, w1b, w2, w2a, w2b, _t1, t2, alpha, dora_scale = weights
    if isinstance(org_module, torch.nn.Linear):
        in_dim, out_dim = org_module.in_features, org_module.out_features
    else:
        in_dim, out_dim = org_module.in_channels // org_module.groups, org_module.out_channels
    out_l, in_m = tuple(w1.shape) if w1 is not None else (w1a.shape[0], w1b.shape[1])
    in_shape = (in_m, in_dim // in_m)
    out_shape = (out_l, out_dim // out_l)
    unbalanced = out_shape[0] > out_shape[1]
    factor = _lokr_factor_for(in_dim, out_dim, in_shape, out_shape)
    if factor is None:
        raise ValueError(f"{lora_name}: no LoKr factorisation matches the stored shapes")
    if t2 is not None:
        lora_dim = t2.shape[0]
    elif w1a is not None:
        lora_dim = w1a.shape[1]
    elif w2a is not None:
        lora_dim = w2a.shape[1]
    else:
        lora_dim = 1
    full_matrix = w1a is None and w2a is None
    module = LokrModule(
        lora_name,
        org_module,
        1.0,
        lora_dim,
        float(alpha) if alpha is not None else lora_dim,
        use_tucker=t2 is not None,
        decompose_both=w1a is not None,
        factor=factor,
        weight_decompose=dora_scale is not None,
        full_matrix=full_matrix,
        unbalanced_factorization=unbalanced,
    )
    stored = {
        "lokr_w1": w1,
        "lokr_w1_a": w1a,
        "lokr_w1_b": w1b,
        "lokr_w2": w2,
        "lokr_w2_a": w2a,
        "lokr_w2_b": w2b,
        "lokr_t2": t2,
        "dora_scale": dora_scale,
    }
    with torch.no_grad():
        for name, value in stored.items():
            if value is None:
                continue
            target = getattr(module, name, None)
            if target is None or tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{lora_name}.{name}: cannot rebuild a module with shape {tuple(value.shape)}")
            target.copy_(value)
    return module


def _shapes_match(module, weights_sd, lora_name) -> bool:
    own = module.state_dict()
    for key, value in own.items():
        stored = weights_sd.get(f"{lora_name}.{key}")
        if stored is not None and tuple(stored.shape) != tuple(value.shape):
            return False
    return True


def _build_module(weights_sd, lora_name, org_module):
    from lycoris.modules import get_module, make_module
    from lycoris.modules.lokr import LokrModule

    lyco_type, params = get_module(weights_sd, lora_name)
    if lyco_type is None:
        return None
    try:
        module = make_module(lyco_type, params, lora_name, org_module)
    except (RuntimeError, ValueError, AttributeError):  # lycoris 4.1.3: see _rebuild_lokr
        if lyco_type is not LokrModule:
            raise
        module = None
    if lyco_type is LokrModule and (module is None or not _shapes_match(module, weights_sd, lora_name)):
        module = _rebuild_lokr(lora_name, org_module, params)
    return module


def create_network_from_weights(
    multiplier,
    file,
    vae,
    text_encoder,
    unet,
    weights_sd=None,
    for_inference=False,
    **kwargs,
):
    """(network, weights_sd), the modules built from the file's tensors (algo read per module).

    Like ``lycoris.kohya.create_network_from_weights`` (same per-module builders, so the
    returned network already holds the file's weights), with the classic text encoder names and
    LoKr modules whose factor LyCORIS mis-infers rebuilt from the tensor shapes
    (see _rebuild_lokr).
    """
    import logging

    import torch

    if weights_sd is None:
        weights_sd = _load_weights_file(file)
    wanted = {key.split(".", 1)[0] for key in weights_sd if "." in key}

    targets = []  # (lora_name, module, is_text_encoder)
    if unet is not None:
        prefix = LycorisNetworkKohya.LORA_PREFIX_UNET
        for name, module in unet.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name in wanted:
                targets.append((lora_name, module, False))
    te_view = kohya_text_encoder_view(text_encoder)
    if te_view is not None:
        tes = list(te_view) if isinstance(te_view, (list, tuple)) else [te_view]
        indexed = isinstance(te_view, (list, tuple))
        for i, te in enumerate(tes):
            prefix = LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER + (f"{i + 1}" if indexed else "")
            for name, module in te.named_modules():
                lora_name = f"{prefix}_{name}".replace(".", "_")
                if lora_name in wanted:
                    targets.append((lora_name, module, True))

    lyco_logger = logging.getLogger("LyCORIS")
    level = lyco_logger.level
    lyco_logger.setLevel(logging.ERROR)
    try:  # an empty network object: no text encoder, a module-less "unet"
        network = LycorisNetworkKohya(None, torch.nn.Module(), multiplier=multiplier, warn_on_unmatched=False)
    finally:
        lyco_logger.setLevel(level)
    network.text_encoder_loras, network.unet_loras = [], []
    seen = set()
    for lora_name, module, is_te in targets:
        if lora_name in seen:
            continue
        seen.add(lora_name)
        lora = _build_module(weights_sd, lora_name, module)
        if lora is None:
            continue
        lora.multiplier = multiplier
        (network.text_encoder_loras if is_te else network.unet_loras).append(lora)
    network.loras = network.text_encoder_loras + network.unet_loras
    return _rebrand(network), weights_sd
