"""The ``ss_*`` / ``modelspec.*`` metadata written into every LoRA file, as sd-scripts writes it."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

# what --no_metadata keeps: the keys a loader needs to rebuild the network
_ESSENTIAL = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
              "ss_network_args")


@dataclass(frozen=True)
class RunFacts:
    """What is known about a run once it is set up, and does not change while it trains."""
    session_id: str
    started_at: float
    num_train_images: int
    batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    warmup_steps: int
    optimizer: str
    resolution: tuple  # (width, height)
    dataset_dirs: dict
    tag_frequency: dict
    bucket_info: dict | None = None
    files: dict = field(default_factory=dict)  # model / VAE names and hashes (file_keys)
    dim_alpha: tuple | None = None  # the rank and alpha read from --network_weights (--dim_from_weights)
    num_reg_images: int = 0
    reg_dataset_dirs: dict = field(default_factory=dict)


def weights_dim_alpha(network) -> tuple | None:
    """(rank, alpha) of the first adapter module that has them: what --dim_from_weights loaded."""
    for module in network.modules():
        if hasattr(module, "lora_dim") and hasattr(module, "alpha") and module is not network:
            return int(module.lora_dim), float(module.alpha)
    return None


def file_keys(args, model_path: str) -> dict:
    """``ss_sd_model_name`` / ``ss_vae_name`` and, for files, their hashes as sd-scripts writes them:
    the old 8-digit webui hash (``ss_*_hash``) and the full SHA-256 (``ss_new_*_hash``)."""
    out = {"ss_sd_model_name": os.path.basename(os.path.normpath(model_path))}
    if os.path.isfile(model_path):
        out.update(ss_sd_model_hash=webui_hash(model_path), ss_new_sd_model_hash=sha256_file(model_path))
    if args.vae:
        out["ss_vae_name"] = os.path.basename(os.path.normpath(args.vae))
        if os.path.isfile(args.vae):
            out.update(ss_vae_hash=webui_hash(args.vae), ss_new_vae_hash=sha256_file(args.vae))
    return out


def webui_hash(path: str) -> str:
    """The old stable-diffusion-webui model hash: SHA-256 of 64 KiB at offset 1 MiB, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dim_alpha(args, facts: RunFacts) -> tuple:
    if facts.dim_alpha:
        return facts.dim_alpha
    return (args.network_dim if args.network_dim is not None else 4), args.network_alpha


def base_model_version(args) -> str:
    if getattr(args, "sdxl", False):
        return "sdxl_base_v1-0"
    return ("sd_v2" if args.v2 else "sd_v1") + ("_v" if args.v_parameterization else "")


def architecture(args) -> str:
    if getattr(args, "sdxl", False):
        return "stable-diffusion-xl-v1-base"
    if args.v2:
        return "stable-diffusion-v2-768-v" if args.v_parameterization else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def build_metadata(args, plan, facts: RunFacts, global_step: int, epoch: int) -> dict:
    md = {**_training_keys(args, plan, facts, global_step, epoch), **_modelspec_keys(args, facts)}
    if args.no_metadata:
        md = {k: md[k] for k in _ESSENTIAL}
    return {k: str(v) for k, v in md.items()}


def _training_keys(args, plan, facts: RunFacts, global_step: int, epoch: int) -> dict:
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs),
        "ss_prior_loss_weight": getattr(args, "prior_loss_weight", 1.0),
        "ss_num_batches_per_epoch": facts.batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": facts.warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": _dim_alpha(args, facts)[0],
        "ss_network_alpha": _dim_alpha(args, facts)[1],
        "ss_network_dropout": args.network_dropout,
        "ss_network_args": json.dumps(plan.net_kwargs),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_full_bf16": bool(args.full_bf16),
        "ss_v2": bool(args.v2),
        "ss_base_model_version": base_model_version(args),
        "ss_clip_skip": args.clip_skip,
        "ss_seed": plan.seed,
        "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_loss_type": args.loss_type,
        "ss_resolution": f"({facts.resolution[0]}, {facts.resolution[1]})",
        "ss_enable_bucket": bool(args.enable_bucket),
        "ss_bucket_no_upscale": bool(args.bucket_no_upscale),
        "ss_min_bucket_reso": plan.buckets.min_reso if plan.buckets else None,
        "ss_max_bucket_reso": plan.buckets.max_reso if plan.buckets else None,
        "ss_bucket_info": json.dumps(facts.bucket_info),
        **facts.files,
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_training_comment": args.training_comment,
        "ss_caption_extension": args.caption_extension,
        "ss_steps": global_step,
        "ss_epoch": epoch,
        "ss_training_finished_at": time.time(),
    }


def _modelspec_keys(args, facts: RunFacts) -> dict:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(args) + "/lora",
        "modelspec.prediction_type": "v" if args.v_parameterization else "epsilon",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if getattr(args, "sdxl", False) else "diffusers"),
        "modelspec.title": getattr(args, "metadata_title", None) or args.output_name,
        "modelspec.resolution": f"{facts.resolution[0]}x{facts.resolution[1]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{f"modelspec.{k}": getattr(args, f"metadata_{k}") for k in ("author", "description", "license", "tags")
           if getattr(args, f"metadata_{k}", None)},
    }
