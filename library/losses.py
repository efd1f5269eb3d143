"""Training losses: l2 (default), l1, huber, and the fork's ``fourier`` option.

``fourier``: the base loss plus ``fourier_weight`` times an L1 distance between FFT magnitude
spectra (orthonormal 2-D FFT over the spatial dims, in fp32), ramped in linearly over
``fourier_warmup_steps``. Diffusion training here compares *latents* (VAE space), where a
frequency loss has no image meaning; the trainer detects latent-space inputs and disables
``fourier`` with a message unless ``--fourier_latent_ok`` is given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "fourier")


def fft_magnitude_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |(|FFT(pred)| - |FFT(target)|)| over spatial frequencies (fp32, shift-invariant)."""
    p = torch.fft.fft2(pred.float(), norm="ortho")
    t = torch.fft.fft2(target.float(), norm="ortho")
    return (p.abs() - t.abs()).abs().mean()


def is_latent_space(x: torch.Tensor, latent_channels: int = 4, vae_scale: int = 8, resolution: int | None = None) -> bool:
    """True when ``x`` looks like VAE latents: the VAE's channel count and 1/8 of the image size."""
    if x.ndim != 4 or x.shape[1] != latent_channels:
        return False
    if resolution is None:
        return True
    return x.shape[-1] * vae_scale == resolution or x.shape[-2] * vae_scale == resolution


def base_loss(pred, target, loss_type: str, huber_c: float = 0.1):
    if loss_type in ("l2", "fourier"):
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    if loss_type == "l1":
        return F.l1_loss(pred.float(), target.float(), reduction="mean")
    if loss_type == "huber":
        # pseudo-Huber, as sd-scripts: 2c(sqrt((x-y)^2 + c^2) - c)
        d = (pred.float() - target.float()) ** 2
        return (2 * huber_c * (torch.sqrt(d + huber_c**2) - huber_c)).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def per_sample_loss(pred, target, loss_type: str, huber_c: float = 0.1):
    """The base loss of each sample (mean over all but the batch dimension)."""
    d = pred.float() - target.float()
    if loss_type in ("l2", "fourier"):
        e = d ** 2
    elif loss_type == "l1":
        e = d.abs()
    elif loss_type == "huber":
        e = 2 * huber_c * (torch.sqrt(d ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return e.mean(dim=tuple(range(1, e.ndim)))


def compute_loss(pred, target, loss_type: str = "l2", step: int = 0, huber_c: float = 0.1,
                 fourier_weight: float = 0.05, fourier_warmup_steps: int = 200, fourier_active: bool = True,
                 weights=None):
    """The batch loss; ``weights`` (one per sample, e.g. --prior_loss_weight for regularisation
    images) weight the base loss of each sample before the mean, as sd-scripts does."""
    if weights is None:
        loss = base_loss(pred, target, loss_type, huber_c)
    else:
        loss = (per_sample_loss(pred, target, loss_type, huber_c) * weights.to(pred.device)).mean()
    if loss_type == "fourier" and fourier_active and fourier_weight > 0:
        ramp = min(1.0, (step + 1) / max(1, fourier_warmup_steps))
        loss = loss + fourier_weight * ramp * fft_magnitude_loss(pred, target)
    return loss
