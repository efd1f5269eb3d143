"""Sample images during training, as sd-scripts makes them (``--sample_prompts`` and friends).

Prompt files and sampler names: :mod:`library.sample_prompts`.

When: at step 0 with ``--sample_at_first``; after every ``--sample_every_n_epochs`` epochs, or
(only when no epoch interval is given) every ``--sample_every_n_steps`` steps. The PNGs go to
``<output_dir>/sample/<output_name>_<step:06d | e<epoch:06d>>_<prompt:02d>_<time>[_<seed>].png`` and
to TensorBoard as images. Sampling draws from its own generators and restores the global random
state, so the training random streams (and a resumed run's weights) are exactly as without it.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from ..sample_prompts import load_prompts, sampler_scheduler

logger = logging.getLogger("train_network")

class Sampler:
    """Makes the sample images of a run (see the module docstring for when and where)."""

    def __init__(self, args, models, network, accelerator, resolution: tuple[int, int]):
        self.args = args
        self.models = models
        self.network = network
        self.accelerator = accelerator
        self.resolution = resolution
        self.prompts = load_prompts(args.sample_prompts) if args.sample_prompts else []
        self.folder = os.path.join(args.output_dir, "sample")

    def due(self, step: int, epoch: int | None) -> bool:
        """sd-scripts' rule: an epoch interval, when given, replaces the step interval."""
        a = self.args
        if not self.prompts:
            return False
        if step == 0:
            return bool(a.sample_at_first)
        if a.sample_every_n_epochs:
            return epoch is not None and epoch % a.sample_every_n_epochs == 0
        return bool(a.sample_every_n_steps) and epoch is None and step % a.sample_every_n_steps == 0

    def maybe_sample(self, step: int, epoch: int | None = None) -> list[str]:
        if not self.due(step, epoch) or not self.accelerator.is_main_process:
            return []
        return self.sample(step, epoch)

    def sample(self, step: int, epoch: int | None = None) -> list[str]:
        os.makedirs(self.folder, exist_ok=True)
        logger.info("sample images at step %d", step)
        files = []
        was_training = self.network.training
        self.network.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad(), self.accelerator.autocast():
            for p in self.prompts:
                files.append(self._one(p, step, epoch))
        self.network.train(was_training)
        return files

    def _one(self, p: dict, step: int, epoch: int | None) -> str:
        seed = p.get("seed")
        gen = torch.Generator(device="cpu").manual_seed(seed if seed is not None else torch.seed())
        width, height = (max(64, p.get(k, d) - p.get(k, d) % 8) for k, d in zip(("width", "height"), self.resolution))
        image = self._pipeline(p.get("sample_sampler") or self.args.sample_sampler)(
            p["prompt"], negative_prompt=p.get("negative_prompt"), width=width, height=height,
            num_inference_steps=p.get("sample_steps", 30), guidance_scale=p.get("scale", 7.5), generator=gen,
        ).images[0]
        number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        name = (f"{self.args.output_name}_{number}_{p['enum']:02d}_{time.strftime('%Y%m%d%H%M%S')}"
                + (f"_{seed}" if seed is not None else "") + ".png")
        path = os.path.join(self.folder, name)
        image.save(path)
        self._to_tensorboard(image, p["enum"], step)
        return path

    def _pipeline(self, sampler: str):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        m = self.models
        scheduler = sampler_scheduler(sampler, m.noise_scheduler, self.args.v_parameterization)
        if m.sdxl:
            pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2,
                                             tokenizer=m.tokenizer, tokenizer_2=m.tokenizer_2, unet=m.unet,
                                             scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _to_tensorboard(self, image, index: int, step: int) -> None:
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"sample_{index:02d}", np.asarray(image), step, dataformats="HWC")
