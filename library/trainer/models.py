"""The frozen model a LoRA trains against: loading, placing on the device, and its facts."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object
    device: torch.device | str = "cpu"
    weight_dtype: torch.dtype = torch.float32  # of the frozen U-Net and text encoders; the VAE stays fp32
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (OpenCLIP bigG, with projection)
    text_encoder_2: object = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return geometry(self.unet.config, self.vae.config).vae_factor


@dataclass(frozen=True)
class Geometry:
    """Sizes a model imposes on its images, from its U-Net and VAE configs."""
    vae_factor: int  # image pixels per latent pixel (8 for SD)
    unet_factor: int  # a latent side divisible by this survives the U-Net's downsamplings (8 for SD 1.x)
    sample_size: int  # the U-Net's latent size

    @property
    def native_resolution(self) -> int:
        """The image size the model was built for (512 for SD 1.5; 64 for the embedded tiny model)."""
        return self.sample_size * self.vae_factor

    @property
    def pixel_multiple(self) -> int:
        """Image sides that are multiples of this keep every U-Net level whole (64 for SD 1.x / 2.x)."""
        return self.vae_factor * self.unet_factor


def geometry(unet_config, vae_config) -> Geometry:
    get = (lambda c, k: c[k]) if isinstance(unet_config, dict) else (lambda c, k: getattr(c, k))
    return Geometry(vae_factor=2 ** (len(get(vae_config, "block_out_channels")) - 1),
                    unet_factor=2 ** (len(get(unet_config, "down_block_types")) - 1),
                    sample_size=int(get(unet_config, "sample_size")))


def read_geometry(model_path: str, embedded: bool, v2: bool = False, sdxl: bool = False) -> Geometry:
    """The geometry from the model's configs, before any weights load (one line if unreadable)."""
    from ..single_file import architecture, is_single_file, peek

    if embedded:
        from ..tiny_sd import UNET_CONFIG, VAE_CONFIG
        from ..tiny_sdxl import SDXL_VAE_CONFIG, UNET_CONFIG as SDXL_UNET_CONFIG

        return geometry(SDXL_UNET_CONFIG, SDXL_VAE_CONFIG) if sdxl else geometry(UNET_CONFIG, VAE_CONFIG)
    if is_single_file(model_path):
        family, metadata = peek(model_path)
        configs = architecture(family or ("sdxl" if sdxl else "sd2" if v2 else "sd1"), metadata, model_path)
        return geometry(configs["unet"], configs["vae"])
    configs = [_load_config(model_path, part) for part in ("unet", "vae")]
    try:
        return geometry(*configs)
    except (KeyError, TypeError) as e:
        raise UserError(f"--pretrained_model_name_or_path {model_path!r}: unet/vae config lacks {e}") from None


def _load_config(model_path: str, part: str) -> dict:
    """``<part>/config.json`` of a diffusers folder, or of a hub id (from the local cache when offline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    try:
        return dict(cls.load_config(model_path, subfolder=part))
    except (OSError, ValueError) as e:
        offline = not os.path.isdir(model_path) and os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (not in the local Hugging Face cache; set HF_HUB_OFFLINE=0 to download it)" if offline else ""
        raise UserError(f"--pretrained_model_name_or_path {model_path!r}: {part}/config.json cannot be read "
                        f"({str(e).splitlines()[0]}){hint}") from None


def ensure_embedded(plan, args, accelerator) -> None:
    """Build the embedded tiny model and the generated dataset when the plan uses them (idempotent)."""
    if plan.embedded:
        from ..tiny_sd import build_tiny_sd
        from ..tiny_sdxl import build_tiny_sdxl

        with accelerator.main_process_first():
            (build_tiny_sdxl if getattr(args, "sdxl", False) else build_tiny_sd)(plan.model_path, seed=0)
    if args.train_data_dir is None and plan.subsets is None:
        from ..dataset_gen import make_dataset

        with accelerator.main_process_first():
            make_dataset(plan.data_dir, n_images=16, resolution=max(plan.resolution), seed=0)


def load_models(model_path: str, args) -> Models:
    """Tokenizer, text encoder, VAE, U-Net and scheduler from a single file, a diffusers folder or
    a hub id; ``--vae`` replaces the VAE. One line naming the model when a part fails."""
    from ..single_file import is_single_file, load_single_file, load_vae

    sdxl = getattr(args, "sdxl", False)
    if is_single_file(model_path):
        models = Models(**load_single_file(model_path, args.v2, args.tokenizer_cache_dir, sdxl))
    else:
        models = _load_diffusers(model_path, sdxl)
    if args.vae:
        models.vae = load_vae(args.vae, models.vae)
    return models


def _load_diffusers(path: str, sdxl: bool = False) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        models = Models(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        )
        if sdxl:
            models.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
            models.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
        return models
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model at {path}: {str(e).splitlines()[0]}") from None


def place(models: Models, device, mixed_precision: str, gradient_checkpointing: bool) -> None:
    """Freeze the model, move it to ``device``, cast the U-Net and text encoder for mixed precision."""
    models.device = device
    models.weight_dtype = WEIGHT_DTYPES.get(mixed_precision, torch.float32)
    for m in (*models.text_encoders, models.vae, models.unet):
        m.requires_grad_(False)
        m.eval()
    for m in (models.vae, models.unet, *models.text_encoders):
        m.to(device)
    if models.weight_dtype != torch.float32:
        for m in (models.unet, *models.text_encoders):
            m.to(dtype=models.weight_dtype)
    if gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()
        for te in models.text_encoders:
            te.gradient_checkpointing_enable()
            te.train()
