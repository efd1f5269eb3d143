"""One batch's diffusion loss: latents, noise and timesteps, prompt embeddings, prediction, loss.

SD 1.x / 2.x condition the U-Net on the text encoder's last (or ``--clip_skip``) hidden states;
SDXL on both encoders' penultimate hidden states side by side, plus the second encoder's pooled,
projected embedding and the six size / crop numbers of each image, as sd-scripts does.

The random draws come, in a fixed order, from the run's noise generator (:class:`Draws`), so a
resumed run draws exactly what the uninterrupted one would have drawn; with several processes
each draws for the whole global batch and keeps its own slice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..losses import compute_loss
from .models import Models


@dataclass
class Draws:
    """Random draws from one generator for the whole global batch; this rank keeps its slice:
    N processes with batch B see exactly the noise of one process with batch N*B."""
    gen: torch.Generator
    world: int = 1
    rank: int = 0

    def _slice(self, fn, shape):
        if self.world == 1:
            return fn(shape, self.gen)
        full = fn((shape[0] * self.world,) + tuple(shape[1:]), self.gen)
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]

    def randn(self, shape) -> torch.Tensor:
        return self._slice(lambda s, g: torch.randn(s, generator=g), shape)

    def randint(self, high: int, shape) -> torch.Tensor:
        return self._slice(lambda s, g: torch.randint(0, high, s, generator=g), shape)


@dataclass
class DiffusionLoss:
    """The training loss of a batch, with the run's loss options (``args``) and frozen models."""
    args: object
    models: Models
    cached_latents: dict = field(default_factory=dict)  # image path -> scaled latent (--cache_latents)
    fourier_active: bool = False
    train_text_encoder: bool = False
    autocast: Callable = contextlib.nullcontext
    cached_prompts: dict = field(default_factory=dict)  # caption -> encoder outputs (--cache_text_encoder_outputs)

    def __call__(self, dataset, idx, draws: Draws, augment, global_step: int) -> torch.Tensor:
        images, captions, flips = dataset.batch(idx, augment)
        latents = self.latents(dataset, idx, images, draws)
        noise, timesteps = self.noise_and_timesteps(latents, draws)
        noisy = self.models.noise_scheduler.add_noise(latents, noise, timesteps)
        dtype = self.models.weight_dtype
        with self.autocast():
            embeddings, pooled = self.prompts(captions)
            extra = None
            if self.models.sdxl:
                time_ids = dataset.size_conditions(idx, flips).to(self.models.device, dtype)
                extra = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
            pred = self.models.unet(noisy.to(dtype), timesteps, embeddings.to(dtype), added_cond_kwargs=extra).sample
        weights = dataset.loss_weights(idx, getattr(self.args, "prior_loss_weight", 1.0))
        return self.loss(pred, latents, noise, timesteps, global_step, weights)

    def prompts(self, captions):
        """(hidden states, pooled embedding or None) of the captions: cached, or encoded now."""
        if not self.cached_prompts:
            return self.encode_prompts(captions)
        hidden, pooled = zip(*(self.cached_prompts[c] for c in captions))
        return torch.stack(hidden), (torch.stack(pooled) if pooled[0] is not None else None)

    def latents(self, dataset, idx, images, draws: Draws) -> torch.Tensor:
        m = self.models
        with torch.no_grad():
            if self.cached_latents:
                return torch.stack([self.cached_latents[dataset.items[i].path] for i in idx])
            dist = m.vae.encode(images.to(m.device, dtype=torch.float32)).latent_dist
            eps = draws.randn(dist.mean.shape).to(m.device)
            return (dist.mean + dist.std * eps) * m.latent_scale

    def noise_and_timesteps(self, latents, draws: Draws):
        device, bsz = self.models.device, latents.shape[0]
        noise = draws.randn(latents.shape).to(device)
        if self.args.noise_offset:
            noise = noise + self.args.noise_offset * draws.randn((bsz, latents.shape[1], 1, 1)).to(device)
        steps = self.models.noise_scheduler.config.num_train_timesteps
        return noise, draws.randint(steps, (bsz,)).to(device)

    def encode_prompts(self, captions):
        """(hidden states, pooled embedding or None) from the text encoder(s). With
        ``--max_token_length`` 150 / 225 each caption is encoded in 75-token chunks whose states
        are joined again (sd-scripts' scheme); SDXL's pooled embedding is the first chunk's."""
        m, clip_skip, length = self.models, self.args.clip_skip, getattr(self.args, "max_token_length", None)
        ids = lambda tokenizer: _token_ids(tokenizer, captions, m.device, length)  # noqa: E731
        join = lambda hidden: _join_chunks(hidden, len(captions), length)  # noqa: E731
        with torch.set_grad_enabled(self.train_text_encoder):
            if m.sdxl:
                out1 = m.text_encoder(ids(m.tokenizer), output_hidden_states=True)
                out2 = m.text_encoder_2(ids(m.tokenizer_2), output_hidden_states=True)
                hidden = torch.cat([join(out1.hidden_states[-2]), join(out2.hidden_states[-2])], dim=-1)
                return hidden, out2.text_embeds[:: out2.text_embeds.shape[0] // len(captions)]
            if clip_skip and clip_skip > 1:
                out = m.text_encoder(ids(m.tokenizer), output_hidden_states=True)
                final_norm = getattr(m.text_encoder, "text_model", m.text_encoder).final_layer_norm
                return join(final_norm(out.hidden_states[-clip_skip])), None
            return join(m.text_encoder(ids(m.tokenizer))[0]), None

    def cache_prompts(self, captions) -> None:
        """``--cache_text_encoder_outputs``: encode every distinct caption once, now."""
        with torch.no_grad():
            for caption in dict.fromkeys(captions):
                hidden, pooled = self.encode_prompts([caption])
                self.cached_prompts[caption] = (hidden[0], pooled[0] if pooled is not None else None)

    def loss(self, pred, latents, noise, timesteps, global_step: int, weights=None) -> torch.Tensor:
        args, scheduler = self.args, self.models.noise_scheduler
        target = scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
        if args.min_snr_gamma:
            alphas = scheduler.alphas_cumprod.to(self.models.device)[timesteps]
            snr = alphas / (1 - alphas)
            w = torch.clamp(snr, max=args.min_snr_gamma) / (snr + 1 if args.v_parameterization else snr)
            per = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
            return (per * w * (weights.to(per.device) if weights is not None else 1)).mean()
        return compute_loss(pred, target, args.loss_type, global_step, args.huber_c, args.fourier_weight,
                            args.fourier_warmup_steps, self.fourier_active, weights)


def _token_ids(tokenizer, captions, device, max_token_length: int | None = None) -> torch.Tensor:
    """Token ids, (B, 77); with ``max_token_length`` N (150 / 225) the caption is tokenized to N + 2
    and cut into N / 75 chunks of ``<BOS> 75 tokens <EOS or PAD>``, (B * N / 75, 77), as sd-scripts
    does. Where padding is not EOS (SD 2.x, SDXL's second tokenizer) a chunk that stops mid-caption
    ends in EOS and an empty chunk starts ``<BOS> <EOS>``."""
    if not max_token_length:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    ids = tokenizer(captions, padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    per = tokenizer.model_max_length - 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_token_length + 1, per):
        chunk = torch.cat([ids[:, :1], ids[:, start:start + per], ids[:, -1:]], dim=1)
        if pad != eos:
            open_end = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[open_end, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1).reshape(-1, tokenizer.model_max_length).to(device)


def _join_chunks(hidden: torch.Tensor, batch: int, max_token_length: int | None) -> torch.Tensor:
    """The chunks' hidden states back into one sequence: the first BOS, every chunk's 75 caption
    positions, the last EOS (sd-scripts' scheme); (B, N + 2, d)."""
    if not max_token_length:
        return hidden
    width = hidden.shape[1]
    hidden = hidden.reshape(batch, -1, hidden.shape[-1])
    parts = [hidden[:, :1]] + [hidden[:, i:i + width - 2] for i in range(1, hidden.shape[1], width)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)
