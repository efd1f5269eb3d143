"""Parameter shape sets of real Stable Diffusion 1.5 adapters, for benchmarks.

The module lists follow kohya sd-scripts' LoRA targets: every Linear / 1x1 Conv inside the
UNet's Transformer2DModel blocks (16 blocks x 12 modules) and the CLIP-L text encoder's
attention and MLP (12 layers x 6 modules): 264 modules, 528 tensors at any rank.
``tiny_sd_lora_shapes`` is the quality benchmark's adapter on the embedded tiny SD (many small
tensors).
"""
from __future__ import annotations

import os

_UNET_BLOCK_CHANNELS = [320, 320, 640, 640, 1280, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
_TEXT_DIM, _TEXT_FF, _CROSS_DIM = 768, 3072, 768


def sd15_linear_modules():
    """(name, in_features, out_features, is_conv1x1) for every module kohya's LoRA wraps."""
    mods = []
    for i, c in enumerate(_UNET_BLOCK_CHANNELS):
        base = f"lora_unet_block{i}"
        mods.append((f"{base}_proj_in", c, c, True))
        for attn, kv_in in (("attn1", c), ("attn2", _CROSS_DIM)):
            mods.append((f"{base}_{attn}_to_q", c, c, False))
            mods.append((f"{base}_{attn}_to_k", kv_in, c, False))
            mods.append((f"{base}_{attn}_to_v", kv_in, c, False))
            mods.append((f"{base}_{attn}_to_out_0", c, c, False))
        mods.append((f"{base}_ff_net_0_proj", c, 8 * c, False))
        mods.append((f"{base}_ff_net_2", 4 * c, c, False))
        mods.append((f"{base}_proj_out", c, c, True))
    for layer in range(12):
        base = f"lora_te_text_model_encoder_layers_{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mods.append((f"{base}_self_attn_{proj}", _TEXT_DIM, _TEXT_DIM, False))
        mods.append((f"{base}_mlp_fc1", _TEXT_DIM, _TEXT_FF, False))
        mods.append((f"{base}_mlp_fc2", _TEXT_FF, _TEXT_DIM, False))
    return mods


def lora_shapes(rank: int = 16, repeat: int = 1):
    """[(name, shape)] of kohya LoRA tensors (down then up per module); `repeat` tiles the set."""
    out = []
    for k in range(repeat):
        for name, fin, fout, conv in sd15_linear_modules():
            tag = f"{name}_{k}" if repeat > 1 else name
            down = (rank, fin, 1, 1) if conv else (rank, fin)
            up = (fout, rank, 1, 1) if conv else (fout, rank)
            out.append((f"{tag}.lora_down.weight", down))
            out.append((f"{tag}.lora_up.weight", up))
    return out


def _factor(dim: int, factor: int):
    """LyCORIS-style factorisation dim = a * b with a <= b (factor -1: closest to sqrt)."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n, length = new_m, new_n, new_m + new_n
    return (m, n) if m <= n else (n, m)


def lokr_shapes(dim: int = 16, factor: int = -1):
    """[(name, shape)] of small LoKr tensors: w1 (full, small) and w2 as a low-rank pair."""
    out = []
    for name, fin, fout, _conv in sd15_linear_modules():
        out_l, out_k = _factor(fout, factor)
        in_m, in_n = _factor(fin, factor)
        out.append((f"{name}.lokr_w1", (out_l, in_m)))
        if dim < max(out_k, in_n) / 2:
            out.append((f"{name}.lokr_w2_a", (out_k, dim)))
            out.append((f"{name}.lokr_w2_b", (dim, in_n)))
        else:
            out.append((f"{name}.lokr_w2", (out_k, in_n)))
    return out


def tiny_sd_lora_shapes(rank: int = 8):
    """[(name, shape)] of the kohya LoRA (``networks.lora``, U-Net only) on the embedded tiny SD
    at ``rank``: the quality benchmark's tiny_sd_long adapter, 168 small tensors (94k parameters
    at rank 8), where a step's cost is per-tensor overhead rather than memory traffic."""
    import networks.lora as lora
    from benchmarks.quality.tasks import CACHE_DIR
    from library.tiny_sd import build_tiny_sd, load_tiny_sd

    sd = load_tiny_sd(build_tiny_sd(os.path.join(CACHE_DIR, "tiny-sd"), seed=0))
    net = lora.create_network(1.0, rank, float(rank), sd.vae, None, sd.unet)
    net.apply_to(None, sd.unet, False, True)
    return [(n, tuple(p.shape)) for n, p in net.named_parameters()]
