"""The command-line options of ``train_network.py`` and ``sdxl_train_network.py``: sd-scripts'
names and meanings."""
from __future__ import annotations

import argparse

from .losses import LOSS_TYPES
from .sample_prompts import SAMPLER_NAMES

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor")
EMBEDDED_MODEL = "tiny-sd"
EMBEDDED_SDXL_MODEL = "tiny-sdxl"


def _float_list(value):
    return float(value)


def setup_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    """The options of ``train_network.py``; with ``sdxl`` those of ``sdxl_train_network.py``
    (the same plus SDXL's own; ``args.sdxl`` tells which script parsed them)."""
    family = "SDXL" if sdxl else "SD 1.x/2.x"
    p = argparse.ArgumentParser(
        prog="sdxl_train_network.py" if sdxl else "train_network.py",
        description=f"Train a LoRA / LoKr network for {family} (kohya sd-scripts compatible).",
    )
    p.set_defaults(sdxl=sdxl)
    a = p.add_argument
    # model and data
    a("--pretrained_model_name_or_path", type=str, default=None,
      help=f"a single-file {family} checkpoint (.safetensors / .ckpt), a diffusers folder or a Hugging Face id; "
           f"omitted or '{EMBEDDED_SDXL_MODEL if sdxl else EMBEDDED_MODEL}': the embedded tiny model, built locally")
    a("--tokenizer_cache_dir", type=str, default=None,
      help="folder holding (or receiving) the CLIP tokenizer a single-file checkpoint needs, as in sd-scripts")
    a("--vae", type=str, default=None, help="a separate VAE: a .safetensors / .ckpt file, a diffusers folder or id")
    a("--no_half_vae", action="store_true", help="accepted: the VAE always runs in fp32 here")
    a("--v2", action="store_true", help="the base model is SD 2.x")
    a("--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768)")
    a("--train_data_dir", type=str, default=None,
      help="kohya layout: <repeats>_<name>/ folders of images with captions; omitted: a generated dataset")
    a("--dataset_config", type=str, default=None,
      help="sd-scripts' dataset TOML ([general], [[datasets]], [[datasets.subsets]]); replaces --train_data_dir")
    a("--reg_data_dir", type=str, default=None, help="regularisation images in <repeats>_<name> folders")
    a("--prior_loss_weight", type=float, default=1.0, help="loss weight of the regularisation images [1.0]")
    a("--caption_extension", type=str, default=".caption", help="caption file extension (.txt is also read)")
    a("--caption_extention", type=str, default=None, help="sd-scripts' old spelling of --caption_extension")
    a("--resolution", type=str, default=None, help="'512' or 'W,H' such as '512,768'; default: the model's sample size")
    a("--enable_bucket", action="store_true", help="aspect-ratio buckets: each image trains at the bucket nearest its shape")
    a("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    a("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    a("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this (64 for SD 1.x / 2.x)")
    a("--bucket_no_upscale", action="store_true", help="buckets follow each image's size; never enlarge an image")
    a("--flip_aug", action="store_true")
    a("--color_aug", action="store_true", help="random hue / gamma changes, as sd-scripts (not with --cache_latents)")
    a("--random_crop", action="store_true", help="crop at a random offset instead of the centre (not with --cache_latents)")
    a("--shuffle_caption", action="store_true", help="shuffle the comma-separated tags of each caption every step")
    a("--keep_tokens", type=int, default=0, help="the first N tags stay in place (not shuffled or dropped)")
    a("--keep_tokens_separator", type=str, default=None,
      help="tags before this separator (and after a second one) stay in place, e.g. '|||'")
    a("--caption_prefix", type=str, default=None, help="text put before every caption")
    a("--caption_suffix", type=str, default=None, help="text put after every caption")
    a("--caption_dropout_rate", type=float, default=0.0, help="probability of training an image with an empty caption")
    a("--caption_dropout_every_n_epochs", type=int, default=0, help="empty captions in every N-th epoch")
    a("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each (not kept) tag")
    a("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
      help="caption tokens seen by the text encoder: 75 [default], 150 or 225 (encoded in 75-token chunks)")
    a("--cache_latents", action="store_true", help="encode every image once with the VAE")
    a("--cache_latents_to_disk", action="store_true",
      help="cache the latents as <image>.npz beside each image and reuse them in later runs (implies --cache_latents)")
    # output
    a("--output_dir", type=str, default="output")
    a("--output_name", type=str, default="last")
    a("--save_model_as", type=str, default="safetensors", choices=["safetensors", "ckpt", "pt"])
    a("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    a("--save_every_n_steps", type=int, default=None)
    a("--save_every_n_epochs", type=int, default=None)
    a("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    a("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states [--save_last_n_epochs]")
    a("--save_last_n_steps", type=int, default=None, help="keep only the step saves of the last N steps")
    a("--save_last_n_steps_state", type=int, default=None, help="the same for step states [--save_last_n_steps]")
    a("--save_state", action="store_true", help="also save the training state (optimizer, scheduler, RNG)")
    a("--save_state_on_train_end", action="store_true")
    a("--resume", type=str, default=None, help="a state folder written by --save_state")
    a("--no_metadata", action="store_true")
    a("--training_comment", type=str, default=None)
    a("--metadata_title", type=str, default=None, help="modelspec.title in the LoRA [--output_name]")
    a("--metadata_author", type=str, default=None, help="modelspec.author")
    a("--metadata_description", type=str, default=None, help="modelspec.description")
    a("--metadata_license", type=str, default=None, help="modelspec.license")
    a("--metadata_tags", type=str, default=None, help="modelspec.tags (comma-separated)")
    # network
    a("--network_module", type=str, default="networks.lora",
      help="networks.lora, networks.lokr, lycoris.kohya or any module with create_network")
    a("--network_dim", type=int, default=None)
    a("--network_alpha", type=float, default=1.0)
    a("--network_dropout", type=float, default=None)
    a("--network_args", type=str, nargs="*", default=None, help="key=value items for create_network")
    a("--network_weights", type=str, default=None, help="start from these LoRA weights")
    a("--network_train_unet_only", action="store_true")
    a("--network_train_text_encoder_only", action="store_true")
    a("--dim_from_weights", action="store_true")
    a("--scale_weight_norms", type=float, default=None)
    # optimizer and schedule
    a("--optimizer_type", type=str, default=None, help="[AdamW]")
    a("--use_8bit_adam", action="store_true", help="sd-scripts' older way to ask for AdamW8bit (bitsandbytes)")
    a("--optimizer_args", type=str, nargs="*", default=None, help="key=value items for the optimizer")
    a("--learning_rate", type=float, default=1e-4)
    a("--unet_lr", type=float, default=None)
    a("--text_encoder_lr", type=float, nargs="*", default=None)
    a("--lr_scheduler", type=str, default="constant", choices=SCHEDULERS)
    a("--lr_warmup_steps", type=str, default="0", help="steps, a ratio (0.1) or a percentage (10%%)")
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1.0)
    a("--lr_scheduler_type", type=str, default=None, help="a scheduler class 'module.Class' built with --lr_scheduler_args")
    a("--lr_scheduler_args", type=str, nargs="*", default=None, help="key=value items for --lr_scheduler_type")
    a("--max_train_steps", type=int, default=1600)
    a("--max_train_epochs", type=int, default=None)
    a("--train_batch_size", type=int, default=1)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_grad_norm", type=float, default=1.0)
    # precision and memory
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    a("--full_fp16", action="store_true")
    a("--full_bf16", action="store_true")
    a("--gradient_checkpointing", action="store_true")
    a("--xformers", action="store_true", help="xformers attention when installed with CUDA; else PyTorch SDPA")
    a("--sdpa", action="store_true", help="accepted: PyTorch's scaled-dot-product attention is the default here")
    a("--mem_eff_attn", action="store_true", help="accepted: PyTorch SDPA is already memory efficient")
    a("--lowram", action="store_true", help="accepted: models load on the CPU and move to the device once")
    a("--highvram", action="store_true", help="accepted: as --lowram, nothing to change here")
    a("--max_data_loader_n_workers", type=int, default=None,
      help="accepted: images are decoded once in the training process and kept in memory")
    a("--persistent_data_loader_workers", action="store_true", help="accepted: as --max_data_loader_n_workers")
    # noise and loss
    a("--seed", type=int, default=None)
    a("--noise_offset", type=float, default=None)
    a("--min_snr_gamma", type=float, default=None)
    a("--clip_skip", type=int, default=None)
    a("--loss_type", type=str, default="l2", choices=LOSS_TYPES)
    a("--huber_c", type=float, default=0.1)
    a("--fourier_weight", type=float, default=0.05)
    a("--fourier_warmup_steps", type=int, default=200)
    a("--fourier_latent_ok", action="store_true", help="keep the fourier loss on latents (disabled by default)")
    # sample images
    a("--sample_prompts", type=str, default=None, help="a .txt / .toml / .json prompt file (sd-scripts' syntax)")
    a("--sample_every_n_steps", type=int, default=None, help="sample every N steps (ignored with --sample_every_n_epochs)")
    a("--sample_every_n_epochs", type=int, default=None, help="sample after every N epochs")
    a("--sample_sampler", type=str, default="ddim", choices=SAMPLER_NAMES, help="the sampler [ddim]")
    a("--sample_at_first", action="store_true", help="also sample before the first step")
    # logging
    a("--logging_dir", type=str, default=None)
    a("--log_with", type=str, default=None, choices=[None, "tensorboard", "wandb", "all"])
    a("--log_prefix", type=str, default=None)
    a("--optimizer_log_every", type=int, default=25, help="log optimizer diagnostics every N steps")
    a("--max_bad_steps", type=int, default=20,
      help="stop (saving the last good state) after this many consecutive steps with non-finite loss")
    a("--no_progress", action="store_true", help="no progress bar")
    # config
    a("--config_file", type=str, default=None, help="TOML file of these options (the command line overrides it)")
    a("--output_config", action="store_true", help="write the options to --config_file and exit")
    if sdxl:
        a("--cache_text_encoder_outputs", action="store_true",
          help="encode each caption once with both text encoders and reuse the outputs (U-Net-only training)")
    return p
