"""Single-file checkpoints (.safetensors / .ckpt in the original LDM layout): the embedded tiny
model written as one file trains exactly as its diffusers folder does; the real SD 1.x / 2.x
layouts, as upstream sd-scripts writes them, load into our shipped architectures (checked at full
size on the meta device, so nothing is allocated)."""
import ast
import math
import os
import tarfile

import pytest
import torch
from safetensors import safe_open

import library.trainer as trainer_mod
import train_network
from helpers import upstream_archive
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.errors import UserError
from library.single_file import (TEXT_ENCODER_CONFIGS, UNET_CONFIGS, VAE_CONFIG, _classic_clip_names, build_models,
                                 load_single_file, load_tokenizer, save_single_file, unet_to_ldm, vae_to_ldm)



@pytest.fixture(scope="module")
def tiny_file(tiny_sd_path, tmp_path_factory):
    from library.tiny_sd import load_tiny_sd

    m = load_tiny_sd(tiny_sd_path)
    path = str(tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")
    save_single_file(path, m.unet, m.vae, m.text_encoder, dict(m.scheduler.config), metadata={"hina.tokenizer": "tiny-sd"})
    return path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_the_tiny_model_survives_a_round_trip_through_one_file(tiny_sd_path, tiny_file):
    from library.tiny_sd import load_tiny_sd

    m = load_tiny_sd(tiny_sd_path)
    with safe_open(tiny_file, "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # the LDM layout, not diffusers names
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    parts = load_single_file(tiny_file, v2=False)
    for a, b in ((m.unet, parts["unet"]), (m.vae, parts["vae"]), (m.text_encoder, parts["text_encoder"])):
        _same_weights(a, b)
    assert parts["tokenizer"]("a red circle").input_ids == m.tokenizer("a red circle").input_ids
    assert torch.equal(parts["noise_scheduler"].alphas_cumprod, m.scheduler.alphas_cumprod)


def _train(tmp_path, model, *extra, name="s"):
    argv = ["--pretrained_model_name_or_path", model, "--max_train_steps", "5", "--train_batch_size", "2",
            "--seed", "7", "--no_progress", "--output_dir", str(tmp_path), "--output_name", name,
            "--caption_extension", ".txt", "--network_dim", "4", "--optimizer_type", "AdaptiveHinaAdamW",
            "--learning_rate", "2e-3", *extra]
    args = train_network.setup_one_line_parser().parse_args(argv)
    return trainer_mod.train(args, trainer_mod.prepare(args))


def _data(tmp_path):
    from library.dataset_gen import make_dataset

    return make_dataset(str(tmp_path / "data"), n_images=8, resolution=64, seed=0)


def test_a_single_file_trains_exactly_as_its_diffusers_folder(tiny_sd_path, tiny_file, tmp_path):
    data = _data(tmp_path)
    folder = _train(tmp_path / "a", tiny_sd_path, "--train_data_dir", data)
    single = _train(tmp_path / "b", tiny_file, "--train_data_dir", data)
    assert single["losses"] == folder["losses"]  # same loss curve, bit for bit
    with safe_open(single["file"], "pt") as f:
        md = f.metadata()
    assert md["ss_sd_model_name"] == "tiny-sd.safetensors"
    assert len(md["ss_new_sd_model_hash"]) == 64 and len(md["ss_sd_model_hash"]) == 8


def test_a_ckpt_file_and_a_separate_vae_load_too(tiny_sd_path, tiny_file, tmp_path):
    from library.tiny_sd import load_tiny_sd

    tensors = {}
    with safe_open(tiny_file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    with pytest.raises(UserError, match="do not fit the architecture"):  # no configs in a .ckpt: SD 1.5's are used
        load_single_file(str(ckpt), v2=False)
    # a VAE file in the LDM layout without its prefix, as VAE files are shared
    vae_file = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")},
              str(vae_file))
    m = load_tiny_sd(tiny_sd_path)
    from library.single_file import load_vae

    _same_weights(load_vae(str(vae_file), m.vae), m.vae)
    _same_weights(load_vae(tiny_sd_path, m.vae), m.vae)  # a diffusers folder
    assert md["hina.tokenizer"] == "tiny-sd"
    out = _train(tmp_path / "v", tiny_file, "--train_data_dir", _data(tmp_path), "--vae", str(vae_file), name="v")
    with safe_open(out["file"], "pt") as f:
        assert f.metadata()["ss_vae_name"] == "vae.safetensors"


@pytest.mark.parametrize("extra,expect", [
    (["--v2"], "is an SD 1.x checkpoint: remove --v2"),
    (["--vae", "/nope/vae.safetensors"], "--vae '/nope/vae.safetensors' does not exist"),
])
def test_single_file_mistakes_end_in_one_line_before_loading(tiny_file, tmp_path, capsys, extra, expect):
    rc = train_network.main(["--pretrained_model_name_or_path", tiny_file, "--output_dir", str(tmp_path),
                             "--no_progress", *extra])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0], err


def test_a_missing_model_or_tokenizer_is_named_in_one_line(tmp_path, capsys):
    assert train_network.main(["--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"),
                               "--output_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert train_network.main(["--pretrained_model_name_or_path", str(tmp_path / "notes.txt"),
                               "--output_dir", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="tokenizer .* not available offline and --tokenizer_cache_dir"):
        load_tokenizer("sd1", str(tmp_path / "tok"))


def test_the_tokenizer_comes_from_the_cache_folder_as_in_sd_scripts(tmp_path):
    from library.tiny_sd import tiny_tokenizer

    tiny_tokenizer().save_pretrained(str(tmp_path / "openai_clip-vit-large-patch14"))
    tok = load_tokenizer("sd1", str(tmp_path))
    assert tok("a red circle").input_ids == tiny_tokenizer()("a red circle").input_ids


# ------------------------------------------------ real layouts, full size, on the meta device
def _upstream_converters():
    with tarfile.open(upstream_archive()) as tar:
        source = tar.extractfile("sd-scripts/library/model_util.py").read().decode()
    tree = ast.parse(source)
    wanted = {"conv_transformer_to_linear", "convert_unet_state_dict_to_sd", "reshape_weight_for_sd",
              "convert_vae_state_dict", "convert_text_encoder_state_dict_to_sd_v2"}
    import diffusers

    ns = {"torch": torch, "math": math, "diffusers": diffusers, "logger": type("L", (), {"info": staticmethod(lambda *a: None)})}
    for node in tree.body:
        if getattr(node, "name", None) in wanted:
            exec(ast.get_source_segment(source, node), ns)
    return ns


def _meta_models(family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        return (UNet2DConditionModel(**UNET_CONFIGS[family]), AutoencoderKL(**VAE_CONFIG),
                CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS[family])))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_checkpoints_written_by_sd_scripts_load_into_our_architectures(family):
    up = _upstream_converters()
    unet, vae, te = _meta_models(family)
    v2 = family == "sd2"
    state = {"model.diffusion_model." + k: v
             for k, v in up["convert_unet_state_dict_to_sd"](v2, unet.state_dict()).items()}
    state.update({"first_stage_model." + k: v for k, v in up["convert_vae_state_dict"](vae.state_dict()).items()})
    clip = _classic_clip_names(te.state_dict())
    if v2:
        state.update({"cond_stage_model.model." + k: v
                      for k, v in up["convert_text_encoder_state_dict_to_sd_v2"](clip, True).items()})
    else:
        state.update({"cond_stage_model.transformer." + k: v for k, v in clip.items()})
    assert sum(v.numel() for k, v in state.items() if k.startswith("model.")) > 800_000_000  # the real size
    parts = build_models(state, {}, family)  # strict: every weight placed, none left over
    assert parts["unet"].config.cross_attention_dim == (1024 if v2 else 768)
    # our writer uses the same names and shapes as sd-scripts'
    ours = unet_to_ldm(unet)
    theirs = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    assert ours.keys() == theirs.keys()
    if not v2:  # sd-scripts turns v2's 1x1 projections into linear ones; ours keeps the model's shapes
        assert all(ours[k].shape == theirs[k].shape for k in ours)
    vae_ours, vae_theirs = vae_to_ldm(vae), {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
    assert vae_ours.keys() == vae_theirs.keys()
    assert all(vae_ours[k].shape == vae_theirs[k].shape for k in vae_ours)


def test_a_hub_id_not_in_the_local_cache_is_one_line_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _data(tmp_path)
    capsys.readouterr()
    rc = train_network.main(["--pretrained_model_name_or_path", "someone/some-sd-model", "--train_data_dir", data,
                             "--output_dir", str(tmp_path / "o")])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'someone/some-sd-model': unet/config.json cannot be read" in err[0], err
