"""Single-file Stable Diffusion checkpoints: the original (LDM) layout in one ``.safetensors`` or
``.ckpt``, as sd-scripts, A1111 and ComfyUI use them.

Reading (offline): the family comes from the user's flags as in sd-scripts (``--v2``), checked
against the file's keys; the architecture from sd-scripts' fixed SD 1.x / 2.x configs (written
below as data), or from the configs the file carries in its metadata (files written by
:func:`save_single_file`, such as the embedded tiny model's). The weights are converted with
diffusers' own LDM converters and loaded strictly, so a file that does not fit its architecture
is one line naming the first mismatch.

The tokenizer is not in the file: as sd-scripts, it comes from ``--tokenizer_cache_dir``
(``<dir>/openai_clip-vit-large-patch14``, or ``stabilityai_stable-diffusion-2`` for SD 2.x),
else from the Hugging Face hub (online, or its local cache); it is saved into the cache folder
after a hub load.

Writing: :func:`save_single_file` turns diffusers models into the LDM layout (the inverse of the
converters above, for any block count), so tests can make single files of the tiny models.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from networks.names import ldm_unet_path, unet_ldm_prefixes

from .errors import UserError

logger = logging.getLogger("train_network")

CONFIG_METADATA_KEY = "hina.diffusers_configs"  # configs carried by files we write
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: an OpenCLIP text tower
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L ...
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # ... and OpenCLIP ViT-bigG
TOKENIZER_IDS = {"sd1": ("openai/clip-vit-large-patch14", None), "sd2": ("stabilityai/stable-diffusion-2", "tokenizer"),
                 "sdxl": ("openai/clip-vit-large-patch14", None),
                 "sdxl_2": ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None)}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# sd-scripts' fixed architectures (library/model_util.py), as diffusers configs
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, steps_offset=1)
_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4, out_channels=4)
UNET_CONFIGS = {
    "sd1": dict(_SD_BLOCKS, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(_SD_BLOCKS, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    # SDXL 1.0 base (sd-scripts' library/sdxl_model_util.py; diffusers' stable-diffusion-xl-base-1.0)
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
VAE_CONFIG = dict(sample_size=256, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215)
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2)
TEXT_ENCODER_CONFIGS = {
    "sd1": dict(_CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768),
    # OpenCLIP ViT-H's text tower without its last layer (SD 2.x uses the penultimate layer)
    "sd2": dict(_CLIP_COMMON, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", projection_dim=512),
}
TEXT_ENCODER_CONFIGS["sdxl"] = TEXT_ENCODER_CONFIGS["sd1"]
SDXL_TEXT_ENCODER_2_CONFIG = dict(_CLIP_COMMON, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
SDXL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)


# ------------------------------------------------------------------ reading
def is_single_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def read_state_dict(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a ``.safetensors`` file or a torch checkpoint (``state_dict`` unwrapped)."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read the checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"cannot read the checkpoint {path}: it holds no state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def peek(path: str) -> tuple[str | None, dict]:
    """(family, metadata) of a ``.safetensors`` file from its header alone (no tensor is read);
    ``(None, {})`` for other formats, which must be loaded whole to be inspected."""
    if not path.lower().endswith(".safetensors"):
        return None, {}
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return detect_family(dict.fromkeys(f.keys())), dict(f.metadata() or {})
    except Exception as e:
        raise UserError(f"cannot read the checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_family(path: str, family: str | None, v2: bool, sdxl: bool = False) -> None:
    """One line when the file is no SD checkpoint or not the family the script and flags say
    (``sdxl_train_network.py``; sd-scripts' ``--v2``)."""
    if family is None:
        raise UserError(f"{path} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* weights)")
    if (family == "sdxl") != sdxl:
        raise UserError(f"{path} is an {FAMILY_NAMES[family]} checkpoint: train it with "
                        + ("sdxl_train_network.py" if family == "sdxl" else "train_network.py"))
    if sdxl:
        return
    if family != ("sd2" if v2 else "sd1"):
        raise UserError(f"{path} is an {FAMILY_NAMES[family]} checkpoint: " + ("add --v2" if family == "sd2" else "remove --v2"))


def detect_family(state: dict) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` from the keys (None when the file is no SD checkpoint)."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        return "sdxl"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        return "sd2"
    if any(k.startswith(UNET_PREFIX) for k in state):
        return "sd1"
    return None


def _normalise_clip_keys(state: dict) -> dict:
    """Some SD 1.x files store the text model without its ``text_model.`` level (sd-scripts accepts them)."""
    out = {}
    for k, v in state.items():
        if k.startswith(CLIP_PREFIX) and not k.startswith(CLIP_PREFIX + "text_model."):
            k = CLIP_PREFIX + "text_model." + k[len(CLIP_PREFIX):]
        out[k] = v
    return out


def architecture(family: str, metadata: dict, path: str = "checkpoint") -> dict:
    """The diffusers configs (unet, vae, text_encoder(_2), scheduler) a single file is loaded into:
    the ones it carries in its metadata, else the family's fixed ones."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            return json.loads(metadata[CONFIG_METADATA_KEY])
        except ValueError:
            raise UserError(f"{path}: its {CONFIG_METADATA_KEY} metadata is not valid JSON") from None
    configs = {"unet": UNET_CONFIGS[family], "vae": VAE_CONFIG, "text_encoder": TEXT_ENCODER_CONFIGS[family],
               "scheduler": SCHEDULER_CONFIG}
    if family == "sdxl":
        configs.update(vae=SDXL_VAE_CONFIG, text_encoder_2=SDXL_TEXT_ENCODER_2_CONFIG)
    return configs


def _empty(build):
    """A model with its parameters on the meta device (no random init: fast, and the global random
    stream is left as it was, so the LoRA's initial weights do not depend on how the model loads)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _load_strict(model, weights: dict, what: str, path: str):
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shapes that differ
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise UserError(f"{path}: its {what} weights do not fit the architecture ({first})") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise UserError(f"{path}: its {what} weights do not fit the architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected; {first})")
    return model


def load_single_file(path: str, v2: bool, tokenizer_cache_dir: str | None = None, sdxl: bool = False) -> dict:
    """The components of a single-file checkpoint, offline: ``tokenizer``, ``text_encoder``, ``vae``,
    ``unet``, ``noise_scheduler`` (and ``tokenizer_2``, ``text_encoder_2`` for SDXL)."""
    state, metadata = read_state_dict(path)
    family = detect_family(state)
    check_family(path, family, v2, sdxl)
    parts = build_models(state, metadata, family, path)
    parts["tokenizer"] = load_tokenizer(family, tokenizer_cache_dir, metadata)
    if family == "sdxl":
        parts["tokenizer_2"] = load_tokenizer("sdxl_2", tokenizer_cache_dir, metadata)
    return parts


def build_models(state: dict, metadata: dict, family: str, path: str = "checkpoint") -> dict:
    """``text_encoder``, ``vae``, ``unet``, ``noise_scheduler`` (and ``text_encoder_2`` for SDXL)
    from an LDM-layout state dict, loaded strictly."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    state = _normalise_clip_keys(state)
    configs = architecture(family, metadata, path)
    unet = _empty(lambda: UNet2DConditionModel(**configs["unet"]))
    _load_strict(unet, convert_ldm_unet_checkpoint(state, dict(unet.config)), "U-Net", path)
    vae = load_vae_weights(_empty(lambda: AutoencoderKL(**configs["vae"])), state, path)
    text_encoder = _empty(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
    _load_strict(text_encoder, _text_encoder_weights(family, state, text_encoder), "text encoder", path)
    parts = {"text_encoder": text_encoder, "vae": vae, "unet": unet,
             "noise_scheduler": DDPMScheduler.from_config(configs["scheduler"])}
    if family == "sdxl":
        te2 = _empty(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
        parts["text_encoder_2"] = _load_strict(te2, _open_clip_weights(state, te2, SDXL_OPEN_CLIP_PREFIX),
                                               "second text encoder", path)
    return parts


def load_vae_weights(vae, state: dict, path: str):
    """Convert LDM VAE weights (with or without the ``first_stage_model.`` prefix) into ``vae``."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(k.startswith(VAE_PREFIX) for k in state):
        state = {VAE_PREFIX + k: v for k, v in state.items()}
    return _load_strict(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), "VAE", path)


def load_vae(path: str, like):
    """``--vae``: a VAE file (LDM names, with or without ``first_stage_model.``, or diffusers names)
    loaded into the architecture of ``like`` (the model's own VAE), or a diffusers VAE folder / id."""
    from diffusers import AutoencoderKL

    if not os.path.isfile(path):
        folder_is_model = os.path.isfile(os.path.join(path, "model_index.json"))
        try:
            return AutoencoderKL.from_pretrained(path, subfolder="vae" if folder_is_model else None)
        except (OSError, ValueError) as e:
            raise UserError(f"--vae {path!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    state, _ = read_state_dict(path)
    vae = _empty(lambda: AutoencoderKL(**{k: v for k, v in dict(like.config).items() if not k.startswith("_")}))
    if any(k.startswith("decoder.up_blocks.") for k in state):
        return _load_strict(vae, state, "VAE", path)
    return load_vae_weights(vae, {k: v for k, v in state.items() if not k.startswith("model_ema.")}, path)


def _text_encoder_weights(family: str, state: dict, text_encoder) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    if family == "sd2":  # the 24th layer and the projection go unused
        return _open_clip_weights(state, text_encoder, OPEN_CLIP_PREFIX, only_known=True)
    weights = {k: v for k, v in convert_ldm_clip_checkpoint(state).items() if k.startswith("text_model.")}
    return _model_names(weights, text_encoder)


def _open_clip_weights(state: dict, text_encoder, prefix: str, only_known: bool = False) -> dict:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    weights = _model_names(convert_open_clip_checkpoint(text_encoder, state, prefix=prefix), text_encoder)
    if only_known:
        keep = set(text_encoder.state_dict())
        weights = {k: v for k, v in weights.items() if k in keep}
    return weights


def _model_names(weights: dict, text_encoder) -> dict:
    """``text_model.*`` names as the model in hand calls them (transformers 5 dropped that level
    in CLIPTextModel, not in CLIPTextModelWithProjection)."""
    if any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        return weights
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in weights.items()}


def _classic_clip_names(state: dict) -> dict:
    """Text-encoder weights under the names single files use (``text_model.*``), whatever the
    transformers version calls them."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def load_tokenizer(family: str, cache_dir: str | None, metadata: dict | None = None):
    """The family's CLIP tokenizer as sd-scripts finds it; one line saying what is missing offline."""
    if (metadata or {}).get("hina.tokenizer") == "tiny-sd":
        from .tiny_sd import tiny_tokenizer

        return tiny_tokenizer()
    model_id, subfolder = TOKENIZER_IDS[family]
    local = os.path.join(cache_dir, model_id.replace("/", "_")) if cache_dir else None
    if local and os.path.isdir(local):
        return _usable(_try_tokenizer(local, None), f"--tokenizer_cache_dir: {local}")
    tokenizer = _try_tokenizer(model_id, subfolder)
    if tokenizer is None or not _has_vocabulary(tokenizer):
        where = f"--tokenizer_cache_dir {cache_dir!r} has no {os.path.basename(local)}/" if local else "no --tokenizer_cache_dir"
        raise UserError(f"the {FAMILY_NAMES[family]} tokenizer ({model_id}) is not available offline and {where}: "
                        "run once online with --tokenizer_cache_dir DIR, or copy a saved tokenizer there")
    if local:
        tokenizer.save_pretrained(local)
    return tokenizer


def _try_tokenizer(where: str, subfolder: str | None):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(where, subfolder=subfolder)
    except (OSError, ValueError):
        return None


def _has_vocabulary(tokenizer) -> bool:
    """A byte-level BPE vocabulary has at least its 256 byte symbols; transformers 5 returns an
    empty tokenizer (2 tokens) instead of failing when the files are missing."""
    return len(tokenizer) > 256


def _usable(tokenizer, what: str):
    if tokenizer is None or not _has_vocabulary(tokenizer):
        raise UserError(f"{what} holds no usable CLIP tokenizer (vocab.json and merges.txt expected)")
    return tokenizer


# ------------------------------------------------------------------ writing
_VAE_ATTENTION_PARTS = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                        ("to_out.0.", "proj_out.")]


def _rename(key: str, pairs) -> str | None:
    for new, old in pairs:
        if key.startswith(new):
            return old + key[len(new):]
    return None


def unet_to_ldm(unet) -> dict:
    """A UNet2DConditionModel's weights under their LDM names (``model.diffusion_model.*``)."""
    prefixes = unet_ldm_prefixes(dict(unet.config))
    out = {}
    for key, value in unet.state_dict().items():
        ldm = ldm_unet_path(key, prefixes)
        if ldm is None:
            raise ValueError(f"no LDM name for the U-Net weight {key}")
        out[UNET_PREFIX + ldm] = value
    return out


def vae_to_ldm(vae) -> dict:
    """An AutoencoderKL's weights under their LDM names (``first_stage_model.*``)."""
    config, out = dict(vae.config), {}
    levels = len(config["block_out_channels"])
    for key, value in vae.state_dict().items():
        ldm = key
        for side in ("encoder", "decoder"):
            if not key.startswith(side + "."):
                continue
            ldm = _vae_side(key[len(side) + 1:], side, levels)
        if ".mid.attn_1." in ldm and value.ndim == 2:  # LDM stores the attention projections as 1x1 convs
            value = value[:, :, None, None]
        out[VAE_PREFIX + ldm] = value
    return out


def _vae_side(key: str, side: str, levels: int) -> str:
    import re

    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        kind, i, part, j, rest = m.groups()
        level = int(i) if kind == "down" else levels - 1 - int(i)
        name = "down" if kind == "down" else "up"
        if part == "resnets":
            return f"{side}.{name}.{level}.block.{j}." + rest.replace("conv_shortcut.", "nin_shortcut.")
        return f"{side}.{name}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
    if key.startswith("mid_block.resnets."):
        j, rest = key[len("mid_block.resnets."):].split(".", 1)
        return f"{side}.mid.block_{int(j) + 1}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
    if key.startswith("mid_block.attentions.0."):
        rest = key[len("mid_block.attentions.0."):]
        return f"{side}.mid.attn_1." + (_rename(rest, _VAE_ATTENTION_PARTS) or rest)
    return f"{side}." + key.replace("conv_norm_out.", "norm_out.")


def open_clip_names(text_encoder) -> dict:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (SDXL's second encoder): the
    attention's q/k/v stacked into ``in_proj``, the projection transposed."""
    out = {}
    state = _classic_clip_names(text_encoder.state_dict())
    layer_parts = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]
    for key, value in state.items():
        if key.startswith("text_model.encoder.layers."):
            n, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(qkv)
            elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                out[f"transformer.resblocks.{n}." + (_rename(rest, layer_parts) or rest)] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("text_model.text_projection.") or key.startswith("text_projection."):
            out["text_projection"] = value.T.contiguous()
    return out


def save_single_file(path: str, unet, vae, text_encoder, scheduler_config: dict | None = None,
                     metadata: dict | None = None, embed_configs: bool = True, text_encoder_2=None) -> str:
    """Write diffusers models as one LDM-layout ``.safetensors`` (atomically): SD 1.x's layout, or
    SDXL's with ``text_encoder_2``. With ``embed_configs`` the diffusers configs travel in the
    metadata, so a non-standard architecture (the tiny models) loads back exactly."""
    from safetensors.torch import save_file

    tensors = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    clip_prefix = SDXL_CLIP_PREFIX if text_encoder_2 is not None else CLIP_PREFIX
    tensors.update({clip_prefix + k: v for k, v in _classic_clip_names(text_encoder.state_dict()).items()})
    if text_encoder_2 is not None:
        tensors.update({SDXL_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_names(text_encoder_2).items()})
    md = dict(metadata or {})
    if embed_configs:
        configs = {"unet": _plain(unet.config), "vae": _plain(vae.config), "text_encoder": _text_config(text_encoder),
                   "scheduler": scheduler_config or SCHEDULER_CONFIG}
        if text_encoder_2 is not None:
            configs["text_encoder_2"] = _text_config(text_encoder_2)
        md[CONFIG_METADATA_KEY] = json.dumps(configs)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=md)
    os.replace(tmp, path)
    return path


def _text_config(text_encoder) -> dict:
    return {k: v for k, v in text_encoder.config.to_dict().items() if not k.startswith("_")}


def _plain(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}
