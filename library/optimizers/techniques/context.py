"""Training-context signals for the C-Optim presets: a context-aware lr multiplier with edge-case
(spike, plateau) and stagnation detection (seed 003, "C-Optim 版本" features).

Provenance. The C-Optim *paper* (Liang et al., arXiv 2411.16085) is the Cautious mask only
(``cautious.py``). The contextual multiplier is the hinablue/gesen2egee addition; there it
only worked when ``step()`` received a closure (kohya never passes one, so it was a constant
1.2), used cosines of 0-dim norms (always 1) and a ``random.uniform`` term. This version
is a redesign: deterministic, bounded, on device, and fed every step without a closure:

- from gradient statistics, every step: the group gradient norm ``n_t`` (a spike detector on
  ``log n_t``) and the *update consistency* ``a_t``, the mean over all elements of
  ``sign(g_t * m_{t-1})`` (+1 where the new gradient agrees with the previous momentum);
- from the loss, when the trainer reports it (``optimizer.report_loss(loss.detach())`` after
  each step): a ring buffer of the last ``W = context_window`` losses, kept on device.

Signals (all 0-dim fp32 tensors; Python ints only count observations):

    c_t        = EMA_0.9(a_t)                                            consistency in [-1, 1]
    grad spike = (log n_t - mu) / sigma > spike_threshold                (EMA mean/var of log n,
                                                                          after 5 observations)
    loss spike = (L_t - mean(window)) / std(window) > spike_threshold    (or L_t not finite)
    plateau    = loss reported and window full:
                     (mean(older half) - mean(newer half)) / |mean(older half)| < plateau_threshold
                 otherwise (gradient statistics only):  c_t < plateau_consistency
    stagnant  <- (stagnant + 1) * plateau ;  stagnation = stagnant >= stagnation_steps

Multiplier (geometric smoothing toward a target, then edge handling, then bounds):

    log T   = consistency_gain * (c_t - consistency_ref) + log(stagnation_boost) * stagnation
    log M  <- log M + adaptation_rate * (log T - log M) + log(spike_factor) * spike
    M       = clamp(M, lo, hi)                                         lr_multiplier_bounds

A spike cuts the multiplier at once (and is not folded into the gradient-norm statistics);
a sustained plateau raises the target by ``stagnation_boost`` until progress resumes (the
seed's "break through stagnation", without randomness). M = 1 until the first consistency
observation, so the first step uses exactly the requested lr. A single loss spike acts once.

Default bounds (1, 2): M never goes below the scheduled lr, so a spike or a run of noisy
(low-consistency) steps takes back an earlier boost but does not cut the lr itself. With the
earlier (0.5, 2) the multiplier sat below 1 on noisy mini-batch losses (a per-step diffusion
loss swings with the sampled timestep, so "spikes" are the normal case there): the quality
benchmark's char-LM ended at no-tune 0.85 with (0.5, 2) and 0.95 with (1, 2); docs/automagic.md
section 6.3 has the numbers. Pass ``lr_multiplier_bounds=(0.5, 2.0)`` for the cutting behaviour.
"""
from __future__ import annotations

import math

import torch

__all__ = ["DEFAULTS", "init", "observe_gradient", "observe_loss", "observe_consistency", "update_multiplier",
           "to_device", "summary"]

DEFAULTS = dict(
    context_window=30,
    adaptation_rate=0.1,
    lr_multiplier_bounds=(1.0, 2.0),  # never below the scheduled lr (module docstring)
    spike_threshold=3.0,
    spike_factor=0.5,
    plateau_threshold=1e-3,
    plateau_consistency=0.02,
    stagnation_steps=30,
    stagnation_boost=1.5,
    consistency_gain=2.0,
    consistency_ref=0.1,
)

_EMA = 0.9
_MIN_HISTORY = 5
_TINY = 1e-30


def init(window: int, device) -> dict:
    """Fresh context: tensors on ``device`` plus Python-int counters (all plain, weights_only-safe)."""

    def z(v=0.0):
        return torch.tensor(v, dtype=torch.float32, device=device)

    return {
        "mult": z(1.0),
        "consistency": z(0.0),
        "gn_mean": z(0.0),
        "gn_var": z(0.0),
        "grad_spike": z(0.0),
        "loss_spike": z(0.0),
        "loss_plateau": z(0.0),
        "stagnant": z(0.0),
        "stagnation": z(0.0),
        "loss_hist": torch.zeros(int(window), dtype=torch.float32, device=device),
        "n_grad": 0,
        "n_loss": 0,
        "n_consistency": 0,
    }


def to_device(ctx: dict, device) -> dict:
    """A copy of ``ctx`` with every tensor cloned onto ``device``."""
    return {k: (v.detach().to(device=device, copy=True) if isinstance(v, torch.Tensor) else v) for k, v in ctx.items()}


def observe_gradient(ctx: dict, grad_norm: torch.Tensor, cfg: dict) -> None:
    """Gradient-norm spike detection; updates the EMA mean/variance of log ||g|| (spikes excluded)."""
    x = torch.log(grad_norm.float().clamp_min(_TINY))
    finite = torch.isfinite(x)
    x = torch.where(finite, x, ctx["gn_mean"])
    n = ctx["n_grad"]
    mean, var = ctx["gn_mean"], ctx["gn_var"]
    if n == 0:
        mean.copy_(x)
        var.zero_()
        ctx["grad_spike"].copy_((~finite).float())
    else:
        if n >= _MIN_HISTORY:
            zscore = (x - mean) / torch.sqrt(var + 1e-12)
            spike = ((zscore > cfg["spike_threshold"]) | ~finite).float()
        else:
            spike = (~finite).float()
        ctx["grad_spike"].copy_(spike)
        w = (1.0 - _EMA) * (1.0 - spike)
        d = x - mean
        mean.add_(w * d)
        var.copy_((1.0 - w) * (var + w * d * d))
    ctx["n_grad"] = n + 1


def observe_consistency(ctx: dict, agreement: torch.Tensor) -> None:
    """Fold this step's mean sign agreement (in [-1, 1]) into the consistency EMA."""
    c = ctx["consistency"]
    if ctx["n_consistency"] == 0:
        c.copy_(agreement)
    else:
        c.lerp_(agreement.to(c.dtype), 1.0 - _EMA)
    ctx["n_consistency"] += 1


def observe_loss(ctx: dict, loss: torch.Tensor, cfg: dict) -> None:
    """Push one reported loss into the on-device window; set the loss spike / plateau flags."""
    hist = ctx["loss_hist"]
    window = hist.numel()
    n = ctx["n_loss"]
    x = loss.detach().reshape(-1)[:1].to(device=hist.device, dtype=torch.float32).reshape(())
    finite = torch.isfinite(x)
    k = min(n, window)
    if k >= 4:
        prev = hist if n >= window else hist[:n]
        std, mean = torch.std_mean(prev, correction=0)
        zscore = (x - mean) / std.clamp_min(1e-6 * mean.abs() + _TINY)
        spike = (zscore > cfg["spike_threshold"]) | ~finite
        x = torch.where(finite, x, mean)
    else:
        spike = ~finite
        x = torch.where(finite, x, torch.zeros_like(x))
    ctx["loss_spike"].copy_(torch.maximum(ctx["loss_spike"], spike.float()))
    hist[n % window] = x
    n += 1
    ctx["n_loss"] = n
    if n >= window:
        chron = torch.roll(hist, -(n % window))
        half = window // 2
        old, new = chron[:half].mean(), chron[half:].mean()
        improvement = (old - new) / old.abs().clamp_min(_TINY)
        ctx["loss_plateau"].copy_((improvement < cfg["plateau_threshold"]).float())


def update_multiplier(ctx: dict, cfg: dict) -> torch.Tensor:
    """Advance the stagnation counter and the multiplier; returns ``ctx["mult"]`` (0-dim)."""
    mult = ctx["mult"]
    if ctx["n_consistency"] == 0:
        return mult
    window = ctx["loss_hist"].numel()
    if ctx["n_loss"] >= window:
        plateau = ctx["loss_plateau"]
    else:
        plateau = (ctx["consistency"] < cfg["plateau_consistency"]).float()
    stagnant = ctx["stagnant"]
    stagnant.add_(1.0).mul_(plateau)
    stagnation = (stagnant >= cfg["stagnation_steps"]).float()
    ctx["stagnation"].copy_(stagnation)
    spike = torch.maximum(ctx["grad_spike"], ctx["loss_spike"])
    ctx["loss_spike"].zero_()  # a reported loss spike acts once
    log_target = cfg["consistency_gain"] * (ctx["consistency"] - cfg["consistency_ref"])
    log_target = log_target + math.log(cfg["stagnation_boost"]) * stagnation
    log_m = torch.log(mult)
    log_m = log_m + cfg["adaptation_rate"] * (log_target - log_m) + math.log(cfg["spike_factor"]) * spike
    lo, hi = cfg["lr_multiplier_bounds"]
    mult.copy_(torch.exp(log_m).clamp_(lo, hi))
    return mult


def summary(ctx: dict) -> dict:
    """Python numbers for diagnostics (host sync: call outside step())."""
    n = ctx["n_loss"]
    window = ctx["loss_hist"].numel()
    hist = ctx["loss_hist"][: min(n, window)]
    return {
        "lr_multiplier": float(ctx["mult"]),
        "consistency": float(ctx["consistency"]),
        "grad_spike": bool(ctx["grad_spike"] > 0),
        "loss_plateau": bool(ctx["loss_plateau"] > 0),
        "stagnant_steps": int(ctx["stagnant"]),
        "stagnation": bool(ctx["stagnation"] > 0),
        "losses_reported": n,
        "loss_window_mean": float(hist.mean()) if hist.numel() else None,
        "loss_window_std": float(hist.std(correction=0)) if hist.numel() else None,
        "gradient_observations": ctx["n_grad"],
    }
