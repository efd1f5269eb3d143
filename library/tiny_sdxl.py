"""A tiny, locally generated SDXL-architecture model for tests, the SDXL presets and benchmarks.

`build_tiny_sdxl(path, seed)` writes a complete diffusers ``StableDiffusionXLPipeline`` folder
(model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
scheduler/) from a seeded random initialisation, like :mod:`library.tiny_sd`. The parts that make
SDXL SDXL are all there, at toy size:

* UNet2DConditionModel with SDXL's conditioning: ``addition_embed_type="text_time"`` (the pooled
  text embedding of the second encoder plus the six size / crop numbers, each given a sinusoidal
  embedding of ``addition_time_embed_dim``), linear projections, no attention at the first level,
  ``transformer_layers_per_block`` > 1 at the second, cross-attention over both encoders' hidden
  states concatenated (32 + 32 = 64 channels).
* Two text encoders: ``CLIPTextModel`` (as SDXL's CLIP ViT-L) and ``CLIPTextModelWithProjection``
  (as OpenCLIP ViT-bigG, gelu, with a text projection), both 2 layers of width 32; both tokenizers
  are the tiny generated BPE of :mod:`library.tiny_sd`.
* AutoencoderKL as the tiny SD one, with SDXL's latent scaling factor 0.13025.
* EulerDiscreteScheduler with SD's training betas (the scheduler SDXL ships with); training reads
  it as a DDPMScheduler, as sd-scripts does.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from .tiny_sd import (BOS_TOKEN, EOS_TOKEN, MAX_LENGTH, SCHEDULER_CONFIG, TEXT_CONFIG, VAE_CONFIG, build_folder,
                      _write_text_encoder_weights, write_tokenizer)

SPEC_VERSION = 1
MARKER = "tiny_sdxl.json"

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (projection_dim) + 6 size / crop numbers
)
SDXL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)
TEXT_CONFIG_2 = dict(TEXT_CONFIG, hidden_act="gelu", projection_dim=32)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class TinySDXL(NamedTuple):
    tokenizer: object
    tokenizer_2: object
    text_encoder: object
    text_encoder_2: object
    vae: object
    unet: object
    scheduler: object


def is_valid_tiny_sdxl(path: str, seed: int | None = None) -> bool:
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if info.get("spec_version") != SPEC_VERSION or (seed is not None and info.get("seed") != int(seed)):
        return False
    return all(os.path.isfile(os.path.join(path, part, "config.json")) for part in ("unet", "vae", "text_encoder",
                                                                                   "text_encoder_2"))


def _write_weights(folder: str, seed: int, vocab: dict) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    torch.manual_seed(seed + 1)
    AutoencoderKL(**SDXL_VAE_CONFIG).save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    ids = dict(vocab_size=len(vocab), bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
               pad_token_id=vocab[EOS_TOKEN])
    for offset, (name, cls, config) in enumerate((("text_encoder", CLIPTextModel, TEXT_CONFIG),
                                                  ("text_encoder_2", CLIPTextModelWithProjection, TEXT_CONFIG_2))):
        torch.manual_seed(seed + 2 + offset)
        model = cls(CLIPTextConfig(**ids, **config))
        model.save_pretrained(os.path.join(folder, name), safe_serialization=True)
        if cls is CLIPTextModel:
            _write_text_encoder_weights(model, os.path.join(folder, name, "model.safetensors"))


def _write_model(folder: str, seed: int) -> None:
    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler

    vocab = write_tokenizer(os.path.join(folder, "tokenizer"))
    write_tokenizer(os.path.join(folder, "tokenizer_2"))
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        _write_weights(folder, seed, vocab)
    EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}).save_pretrained(
        os.path.join(folder, "scheduler"))
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(model_index, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:  # last: the folder is complete
        json.dump({"seed": int(seed), "spec_version": SPEC_VERSION, "max_length": MAX_LENGTH}, f, indent=2)


def build_tiny_sdxl(path: str, seed: int = 0) -> str:
    """Write (or reuse) the tiny SDXL diffusers folder at `path`; returns the absolute path."""
    return build_folder(path, seed, is_valid_tiny_sdxl, _write_model, MARKER, "tiny SDXL")


def load_tiny_sdxl(path: str, device: str = "cpu") -> TinySDXL:
    """The seven components with the standard from_pretrained calls (no network access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = os.fspath(path)
    return TinySDXL(
        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device),
        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").to(device),
        AutoencoderKL.from_pretrained(path, subfolder="vae").to(device),
        UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device),
        DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )
