"""A tiny, locally generated Stable Diffusion 1.x model for tests and benchmarks.

`build_tiny_sd(path, seed)` writes a complete diffusers folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) whose weights come from a seeded random initialisation,
so nothing is downloaded and the same seed always gives byte-identical files. The architecture
is the real SD 1.x one at toy size:

* UNet2DConditionModel: CrossAttnDownBlock2D x2, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D x2,
  block_out_channels (32, 64), one layer per block, cross_attention_dim 32, 1x1-conv proj_in /
  proj_out as in SD 1.5 (use_linear_projection=False), sample_size 8. That gives 7
  Transformer2DModel blocks, each with attn1 / attn2 / ff, i.e. the same module names kohya's
  LoRA targets on SD 1.5 (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` ...).
* AutoencoderKL: 4 latent channels, 8x downsampling (64 px image -> 8x8 latent).
* CLIPTextModel: hidden 32, 2 layers, 2 heads, 77 positions, quick_gelu.
* CLIPTokenizer: byte-level BPE whose vocab.json / merges.txt are generated here: the 256
  byte-unicode symbols, their ``</w>`` forms, a few merges that make the caption words of
  ``library.dataset_gen`` single tokens, then ``<|startoftext|>`` and ``<|endoftext|>`` last
  (the same layout as OpenAI's CLIP vocabulary).
* DDPMScheduler with SD's training config (scaled_linear, 1000 steps, 0.00085 .. 0.012).

Loading uses only the ordinary calls, e.g.
``UNet2DConditionModel.from_pretrained(path, subfolder="unet")`` or
``StableDiffusionPipeline.from_pretrained(path)``; `load_tiny_sd(path)` does the five calls.

Reuse: a folder holding ``tiny_sd.json`` with the same seed and spec version and all component
files is reused as is. The model is built in a temporary sibling folder and renamed into place,
so a crash never leaves a half-written model at `path`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import NamedTuple

SPEC_VERSION = 1
MARKER = "tiny_sd.json"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,  # diffusers' legacy name: number of heads (head dim 8 / 16)
    norm_num_groups=8,
    use_linear_projection=False,
)

VAE_CONFIG = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.18215,
)

TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
    steps_offset=1,
)

# Words that get whole-word BPE tokens (the captions of library.dataset_gen use them).
VOCAB_WORDS = (
    "a an the on of with in and photo image picture drawing style background small large big "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle diamond cross ring star shape shapes plain striped stripes "
    "checkered dotted dots noise sks"
).split()

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class TinySD(NamedTuple):
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler: object


# ----------------------------------------------------------------------------- tokenizer files


def byte_unicode_table() -> dict[int, str]:
    """Map every byte to a printable unicode character (the byte-level BPE convention).

    Printable latin-1 bytes map to themselves; the remaining ones are moved, in order, to the
    code points from 256 upwards.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_segment(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: merge the lowest-ranked adjacent pair until none applies."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best, best_rank = None, None
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = (symbols[i], symbols[i + 1]), r
        if best is None:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def make_tokenizer_vocab(words=VOCAB_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a small CLIP-style byte-level BPE.

    For each word the current segmentation under the merges so far is computed, then merges
    joining those segments left to right are appended, so every listed word ends up as a single
    ``word</w>`` token whatever the order of the list.
    """
    byte_chars = list(byte_unicode_table().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        segs = _bpe_segment(symbols, ranks)
        while len(segs) > 1:
            pair = (segs[0], segs[1])
            new = pair[0] + pair[1]
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            if new not in known:
                known.add(new)
                tokens.append(new)
            segs = [new] + segs[2:]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges


def write_tokenizer(folder: str) -> dict[str, int]:
    os.makedirs(folder, exist_ok=True)
    vocab, merges = make_tokenizer_vocab()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    config = dict(
        special,
        tokenizer_class="CLIPTokenizer",
        model_max_length=MAX_LENGTH,
        do_lower_case=True,
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, sort_keys=True)
    return vocab


# ----------------------------------------------------------------------------- build / load


def _expected_files(path: str) -> list[str]:
    return [
        os.path.join(path, "model_index.json"),
        os.path.join(path, "unet", "config.json"),
        os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"),
        os.path.join(path, "vae", "config.json"),
        os.path.join(path, "vae", "diffusion_pytorch_model.safetensors"),
        os.path.join(path, "text_encoder", "config.json"),
        os.path.join(path, "text_encoder", "model.safetensors"),
        os.path.join(path, "tokenizer", "vocab.json"),
        os.path.join(path, "tokenizer", "merges.txt"),
        os.path.join(path, "tokenizer", "tokenizer_config.json"),
        os.path.join(path, "scheduler", "scheduler_config.json"),
    ]


def is_valid_tiny_sd(path: str, seed: int | None = None) -> bool:
    """True if `path` holds a complete model written by build_tiny_sd (with `seed`, if given)."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if info.get("spec_version") != SPEC_VERSION:
        return False
    if seed is not None and info.get("seed") != int(seed):
        return False
    return all(os.path.isfile(p) for p in _expected_files(path))


def _write_text_encoder_weights(text_encoder, file: str) -> None:
    """Store the CLIP text encoder with the classic ``text_model.`` key prefix.

    transformers 5 flattened CLIPTextModel (``encoder.layers.N`` directly on the model, no
    ``text_model`` submodule) and its save_pretrained writes unprefixed keys, which transformers
    4.x would not load. The prefixed layout is the one real SD checkpoints use; transformers 5
    loads it too.
    """
    from safetensors.torch import save_file

    state = text_encoder.state_dict()
    if not hasattr(text_encoder, "text_model"):
        state = {f"text_model.{k}": v for k, v in state.items()}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, file, metadata={"format": "pt"})


def _write_weights(folder: str, seed: int, vocab: dict[str, int]) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Each component gets its own seed so that changing one spec leaves the others' weights
    # alone. torch's CPU initialisation is deterministic under a fixed seed.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    del unet

    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    del vae

    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    te_dir = os.path.join(folder, "text_encoder")
    text_encoder.save_pretrained(te_dir, safe_serialization=True)
    _write_text_encoder_weights(text_encoder, os.path.join(te_dir, "model.safetensors"))
    del text_encoder


def _write_model(folder: str, seed: int) -> None:
    import diffusers
    import torch
    from diffusers import DDPMScheduler

    vocab = write_tokenizer(os.path.join(folder, "tokenizer"))
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        _write_weights(folder, seed, vocab)

    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(os.path.join(folder, "scheduler"))

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(model_index, f, indent=2, sort_keys=True)
    # The marker goes last: its presence means the rest is complete.
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        json.dump({"seed": int(seed), "spec_version": SPEC_VERSION}, f, indent=2, sort_keys=True)


def build_tiny_sd(path: str, seed: int = 0) -> str:
    """Write (or reuse) the tiny SD 1.x diffusers folder at `path`; returns the absolute path.

    An existing folder built by this function with the same seed is reused. One built with a
    different seed is rebuilt. A non-empty folder that this function did not write is never
    touched: FileExistsError.
    """
    return build_folder(path, seed, is_valid_tiny_sd, _write_model, MARKER, "tiny SD")


def build_folder(path: str, seed: int, is_valid, write, marker: str, what: str) -> str:
    """Build a model folder atomically: ``write(tmp, seed)`` into a temporary sibling, then rename
    it into place; reuse a folder ``is_valid(path, seed)`` accepts; never touch a foreign folder."""
    path = os.path.abspath(os.fspath(path))
    seed = int(seed)
    if is_valid(path, seed):
        return path
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise FileExistsError(f"{path} exists and is not a {what} model folder; refusing to overwrite")

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        write(tmp, seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if is_valid(path, seed):  # another process finished first
            return path
        if os.path.isdir(path):
            # ours (marker present) but stale or incomplete, or empty: move aside, then drop
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not is_valid(path, seed):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tiny_sd(path: str, device: str = "cpu", dtype=None) -> TinySD:
    """Load the five components with the standard from_pretrained calls (no network access).

    Equivalent to::

        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        AutoencoderKL.from_pretrained(path, subfolder="vae")
        UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = os.fspath(path)
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).to(device)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).to(device)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return TinySD(tokenizer, text_encoder, vae, unet, scheduler)


def tiny_tokenizer():
    """The tiny models' generated tokenizer, without a model folder (single-file checkpoints of
    the tiny models name it in their metadata instead of carrying it)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(folder)
        return CLIPTokenizer.from_pretrained(folder)
