"""The training images as the loop sees them: the dataset (one size, or aspect-ratio buckets),
optional cached latents, and each process's share of every batch."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..captions import CaptionRules, class_tokens
from ..dataset import FolderDataset
from .models import Models

logger = logging.getLogger("train_network")


def build_dataset(args, plan, is_main: bool = True) -> FolderDataset:
    dataset = FolderDataset(plan.data_dir, plan.resolution, args.caption_extension, args.flip_aug, plan.buckets,
                            CaptionRules.from_args(args), color_aug=args.color_aug, random_crop=args.random_crop,
                            subsets=plan.subsets)
    if is_main:
        _report_fits(dataset)
        _report_missing_captions(dataset)
    return dataset


def _report_missing_captions(dataset: FolderDataset) -> None:
    """One line for every image without a caption file: its folder's class token stands in."""
    missing = {folder: info["missing_captions"] for folder, info in dataset.folders.items() if info["missing_captions"]}
    if missing:
        logger.warning("%d image(s) have no caption file; their folder's class token is used instead (%s)",
                       sum(missing.values()), ", ".join(f"{f}: {class_tokens(f)!r}" for f in missing))


def _report_fits(dataset: FolderDataset) -> None:
    """With buckets: one line per bucket. Without: the first image the crop cuts into, once."""
    info = dataset.bucket_info()
    if info is not None:
        for i, b in info["buckets"].items():
            logger.info("bucket %d: %dx%d, %d images (with repeats)", i, *b["resolution"], b["count"])
        logger.info("mean aspect-ratio error of the buckets: %.4f", info["mean_img_ar_error"])
        return
    cropped = dataset.first_cropped()
    if cropped is not None:
        path, fit = cropped
        w, h = dataset.resolution
        logger.warning("%s is %dx%d, another shape than the training size %dx%d: it is resized and centre-cropped, "
                       "keeping %.0f%% of it (other images may be too; --enable_bucket trains each whole)",
                       path, *fit.original, w, h, 100 * fit.kept_fraction)


def cache_latents(dataset: FolderDataset, models: Models, to_disk: bool = False) -> dict:
    """``--cache_latents``: every distinct image encoded once (the VAE's mode, scaled). With
    ``to_disk`` each latent is also kept beside its image as ``<image>.npz`` (as sd-scripts names
    it) and reused by later runs while the image's bucket is the same."""
    cached = {}
    with torch.no_grad():
        for path in sorted({item.path for item in dataset.items}):
            bucket = dataset.fits[path].bucket
            latent = _read_latent(path, bucket, models.latent_scale) if to_disk else None
            if latent is None:
                img = dataset.image(path).unsqueeze(0).to(models.device)
                latent = models.vae.encode(img).latent_dist.mode()[0] * models.latent_scale
                if to_disk:
                    _write_latent(path, bucket, models.latent_scale, latent)
            cached[path] = latent.to(models.device)
    return cached


def _npz(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".npz"


def _read_latent(image_path: str, bucket: tuple, scale: float):
    try:
        with np.load(_npz(image_path)) as f:
            if tuple(f["bucket"]) != tuple(bucket) or float(f["scale"]) != scale:
                return None
            return torch.from_numpy(f["latents"].copy())
    except (OSError, KeyError, ValueError):
        return None


def _write_latent(image_path: str, bucket: tuple, scale: float, latent: torch.Tensor) -> None:
    tmp = _npz(image_path) + ".tmp.npz"
    np.savez(tmp, latents=latent.float().cpu().numpy(), bucket=np.array(bucket), scale=np.array(scale))
    os.replace(tmp, _npz(image_path))


def rank_share(global_batch: list, batch_size: int, rank: int) -> list:
    """This process's items of a global batch (all of it with one process)."""
    return global_batch[rank * batch_size:(rank + 1) * batch_size]
