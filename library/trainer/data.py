"""The training images as the loop sees them: the dataset, optional cached latents, and each
process's share of every batch."""
from __future__ import annotations

import torch

from ..dataset import FolderDataset
from .models import Models


def build_dataset(args, plan, resolution: int) -> FolderDataset:
    return FolderDataset(plan.data_dir, resolution, args.caption_extension, args.flip_aug)


def cache_latents(dataset: FolderDataset, models: Models) -> dict:
    """``--cache_latents``: every distinct image encoded once (the VAE's mode, scaled)."""
    cached = {}
    with torch.no_grad():
        for path in {item.path for item in dataset.items}:
            img = dataset.image(path).unsqueeze(0).to(models.device)
            cached[path] = models.vae.encode(img).latent_dist.mode()[0] * models.latent_scale
    return cached


def batch_indices(order: list, batch: int, global_batch: int, batch_size: int, world: int, rank: int) -> list:
    """This process's items of batch number ``batch`` in the epoch ``order``: its slice of the global
    batch, wrapping around the epoch; a single process gets a short last batch instead."""
    start = batch * global_batch + rank * batch_size
    idx = [order[(start + j) % len(order)] for j in range(batch_size)]
    if world == 1:
        idx = idx[: max(1, len(order) - batch * global_batch)]
    return idx
