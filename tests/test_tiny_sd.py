import json
import os

import pytest
import torch

from conftest_tiny import (  # noqa: F401  (fixtures are used by name)
    encode_text,
    one_torch_thread,
    tiny_models,
    tiny_sd_path,
)
from library import tiny_sd
from library.tiny_sd import build_tiny_sd, is_valid_tiny_sd, load_tiny_sd


def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_same_seed_gives_identical_bytes(tmp_path, tiny_sd_path):
    other = build_tiny_sd(str(tmp_path / "again"), seed=0)
    a, b = _tree_bytes(tiny_sd_path), _tree_bytes(other)
    assert sorted(a) == sorted(b)
    assert "unet/diffusion_pytorch_model.safetensors" in a
    for rel in a:
        assert a[rel] == b[rel], rel


def test_other_seed_gives_other_weights(tmp_path, tiny_sd_path):
    other = build_tiny_sd(str(tmp_path / "seed1"), seed=1)
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        with open(os.path.join(tiny_sd_path, rel), "rb") as f1, open(os.path.join(other, rel), "rb") as f2:
            assert f1.read() != f2.read(), rel
    # configs and tokenizer do not depend on the seed
    for rel in ("unet/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        with open(os.path.join(tiny_sd_path, rel)) as f1, open(os.path.join(other, rel)) as f2:
            assert f1.read() == f2.read(), rel


def test_existing_model_is_reused(tiny_sd_path):
    weights = os.path.join(tiny_sd_path, "unet", "diffusion_pytorch_model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert build_tiny_sd(tiny_sd_path, seed=0) == tiny_sd_path
    assert os.stat(weights).st_mtime_ns == before
    assert is_valid_tiny_sd(tiny_sd_path, seed=0)
    assert not is_valid_tiny_sd(tiny_sd_path, seed=3)


def test_rebuilds_for_other_seed_and_repairs(tmp_path):
    path = build_tiny_sd(str(tmp_path / "m"), seed=0)
    build_tiny_sd(path, seed=5)
    with open(os.path.join(path, tiny_sd.MARKER)) as f:
        assert json.load(f)["seed"] == 5
    os.remove(os.path.join(path, "vae", "diffusion_pytorch_model.safetensors"))  # damaged
    assert not is_valid_tiny_sd(path)
    build_tiny_sd(path, seed=5)
    assert is_valid_tiny_sd(path, seed=5)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp folders left


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_sd(str(tmp_path / "x"))
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_small_on_disk(tiny_sd_path):
    total = sum(len(b) for b in _tree_bytes(tiny_sd_path).values())
    assert total < 20 * 1024 * 1024
    with open(os.path.join(tiny_sd_path, "model_index.json")) as f:
        index = json.load(f)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]


def test_components_load_with_from_pretrained(tiny_sd_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    te = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")

    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(unet.config.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.config.cross_attention_dim == 32 and unet.config.sample_size == 8
    classes = {type(m).__name__ for m in unet.modules()}
    assert {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"} <= classes
    names = dict(unet.named_modules())
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    for sub in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ff.net.0.proj", "ff.net.2"):
        assert isinstance(names[f"{block}.{sub}"], torch.nn.Linear), sub
    assert isinstance(names["down_blocks.0.attentions.0.proj_in"], torch.nn.Conv2d)
    assert sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules()) == 7

    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4
    assert te.config.hidden_size == 32 and te.config.num_hidden_layers == 2
    assert te.config.max_position_embeddings == 77
    assert tok.model_max_length == 77 and len(tok) == te.config.vocab_size

    assert sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.beta_start == pytest.approx(0.00085) and sched.config.beta_end == pytest.approx(0.012)
    assert float(sched.betas[0]) == pytest.approx(0.00085, rel=1e-4)
    assert float(sched.betas[-1]) == pytest.approx(0.012, rel=1e-4)


def test_text_encoder_file_uses_classic_key_layout(tiny_sd_path):
    from safetensors import safe_open

    with safe_open(os.path.join(tiny_sd_path, "text_encoder", "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_tokenizer_byte_level_bpe(tiny_models, tiny_sd_path):
    tok = tiny_models.tokenizer
    vocab = tok.get_vocab()
    table = tiny_sd.byte_unicode_table()
    for ch in table.values():
        assert ch in vocab and ch + "</w>" in vocab
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    ids = tok("A Red circle on a blue striped background").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>",
                    "striped</w>", "background</w>", "<|endoftext|>"]
    # words outside the merge list fall back to byte symbols; non-ascii works too
    ids = tok("qzxv ü!").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:5] == ["q", "z", "x", "v</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == "qzxv ü !"  # CLIP decodes word by word
    padded = tok(["x"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and int(padded[0, -1]) == vocab["<|endoftext|>"]
    with open(os.path.join(tiny_sd_path, "tokenizer", "merges.txt")) as f:
        assert f.readline().startswith("#version")


def test_forward_passes(tiny_models):
    m = tiny_models
    with torch.no_grad():
        hidden = encode_text(m)
        assert hidden.shape == (2, 77, 32)
        image = torch.rand(2, 3, 64, 64) * 2 - 1
        posterior = m.vae.encode(image).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(0)) * m.vae.config.scaling_factor
        assert latents.shape == (2, 4, 8, 8)
        noise = torch.randn_like(latents)
        t = torch.tensor([10, 999])
        noisy = m.scheduler.add_noise(latents, noise, t)
        pred = m.unet(noisy, t, encoder_hidden_states=hidden).sample
        assert pred.shape == latents.shape and torch.isfinite(pred).all()
        decoded = m.vae.decode(latents / m.vae.config.scaling_factor).sample
        assert decoded.shape == (2, 3, 64, 64) and torch.isfinite(decoded).all()
        # conditioning matters: other captions, other prediction
        other = m.unet(noisy, t, encoder_hidden_states=encode_text(m, ["a", "b"])).sample
        assert not torch.allclose(pred, other)


def test_loaded_weights_are_deterministic(tiny_sd_path):
    a, b = load_tiny_sd(tiny_sd_path), load_tiny_sd(tiny_sd_path)
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()):
        assert torch.equal(x, y)


def test_pipeline_loads_and_samples(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd(str(tmp_path / "rng"), seed=7)
    assert torch.equal(torch.rand(3), expected)
