"""sdxl_train_network.py on the embedded tiny SDXL-architecture model: the presets train, the LoRA
loads in diffusers' StableDiffusionXLPipeline and changes its output, a single file trains as its
folder does, cached text-encoder outputs, and SDXL checkpoints as sd-scripts writes them load."""
import ast
import json
import math
import os
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import library.trainer as trainer_mod
import train_network
from helpers import cache_dir_env, upstream_archive
from library.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache holding the tiny SDXL model and the generated dataset, built once."""
    from library.dataset_gen import make_dataset
    from library.tiny_sdxl import build_tiny_sdxl

    d = tmp_path_factory.mktemp("cache")
    build_tiny_sdxl(str(d / "tiny-sdxl"), seed=0)
    make_dataset(str(d / "demo-data"), n_images=16, resolution=64, seed=0)
    with cache_dir_env(d):
        yield d


def _argv(tmp_path, *extra, steps=3, name="x"):
    return ["--max_train_steps", str(steps), "--train_batch_size", "2", "--seed", "1", "--no_progress",
            "--output_dir", str(tmp_path), "--output_name", name, "--caption_extension", ".txt",
            "--network_dim", "4", "--network_alpha", "4", *extra]


def _train(tmp_path, *extra, **kw):
    args = train_network.setup_one_line_parser(sdxl=True).parse_args(_argv(tmp_path, *extra, **kw))
    return trainer_mod.train(args, trainer_mod.prepare(args))


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), list(f.keys())


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("sdxl_*.toml")))
def test_the_sdxl_presets_train(cache, tmp_path, preset):
    rc = train_network.main([*_argv(tmp_path), "--config_file", str(ROOT / "configs" / preset)], sdxl=True)
    assert rc == 0
    md, keys = _metadata(tmp_path / "x.safetensors")
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # the presets train the U-Net only


def test_the_lora_loads_in_diffusers_sdxl_pipeline_and_changes_its_output(cache, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (requirements-test.txt)")
    from diffusers import StableDiffusionXLPipeline

    out = _train(tmp_path, "--optimizer_type", "AdaptiveHinaAdamW", "--learning_rate", "5e-3", steps=4)["file"]
    _, keys = _metadata(out)
    modules = {k.split(".")[0] for k in keys}
    counts = {p: sum(m.startswith(p) for m in modules) for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert all(counts.values()), counts  # kohya's SDXL names: lora_te1_ / lora_te2_ for the two encoders ...
    unet_names = [m for m in modules if m.startswith("lora_unet_")]
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for m in unet_names), unet_names[:3]  # ... and the original block names for the U-Net
    pipe = StableDiffusionXLPipeline.from_pretrained(str(cache / "tiny-sdxl"))
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(out)
    after = image()
    assert not torch.allclose(before, after)
    loaded = [sum(1 for _, m in model.named_modules() if "default_0" in getattr(m, "lora_A", {}))
              for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)]
    assert loaded == [counts["lora_unet_"], counts["lora_te1_"], counts["lora_te2_"]]  # every module placed


def test_hina_adamw_trains_sdxl_and_a_single_file_matches_its_folder(cache, tmp_path):
    from library.single_file import save_single_file
    from library.tiny_sdxl import load_tiny_sdxl

    m = load_tiny_sdxl(str(cache / "tiny-sdxl"))
    single = str(tmp_path / "tiny-sdxl.safetensors")
    save_single_file(single, m.unet, m.vae, m.text_encoder, dict(m.scheduler.config),
                     metadata={"hina.tokenizer": "tiny-sd"}, text_encoder_2=m.text_encoder_2)
    with safe_open(single, "pt") as f:
        keys = set(f.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    common = ["--optimizer_type", "HinaAdamW", "--learning_rate", "1e-3", "--train_data_dir", str(cache / "demo-data")]
    folder = _train(tmp_path / "a", "--pretrained_model_name_or_path", str(cache / "tiny-sdxl"), *common)
    one_file = _train(tmp_path / "b", "--pretrained_model_name_or_path", single, *common)
    assert one_file["losses"] == folder["losses"]


def test_cached_text_encoder_outputs_train_the_unet_alike(cache, tmp_path):
    common = ["--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--network_train_unet_only"]
    plain = _train(tmp_path / "a", *common)["losses"]
    cached = _train(tmp_path / "b", *common, "--cache_text_encoder_outputs")["losses"]
    assert torch.allclose(torch.tensor(plain), torch.tensor(cached), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("script,extra,expect", [
    ("sd", ["--pretrained_model_name_or_path", "{sdxl}"], "is an SDXL model: train it with sdxl_train_network.py"),
    ("sdxl", ["--pretrained_model_name_or_path", "{sd}"], "is not an SDXL model: train it with train_network.py"),
    ("sdxl", ["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs needs --network_train_unet_only"),
])
def test_sdxl_mistakes_end_in_one_line(cache, tmp_path, capsys, script, extra, expect):
    from library.tiny_sd import build_tiny_sd

    sd = build_tiny_sd(str(tmp_path / "tiny-sd"))
    extra = [e.format(sdxl=cache / "tiny-sdxl", sd=sd) for e in extra]
    capsys.readouterr()  # the build's own progress output
    rc = train_network.main(["--output_dir", str(tmp_path / "o"), "--no_progress", *extra], sdxl=script == "sdxl")
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0], err
    assert err[0].startswith("sdxl_train_network.py: error:" if script == "sdxl" else "train_network.py: error:")


def test_a_single_sd_file_is_refused_by_the_sdxl_script_and_back(tmp_path):
    from library.single_file import check_family

    with pytest.raises(UserError, match="train it with train_network.py"):
        check_family("m.safetensors", "sd1", v2=False, sdxl=True)
    with pytest.raises(UserError, match="train it with sdxl_train_network.py"):
        check_family("m.safetensors", "sdxl", v2=False, sdxl=False)


# ------------------------------------------------ SDXL base as sd-scripts writes it, full size, meta device
def test_sdxl_checkpoints_written_by_sd_scripts_load_into_our_architecture():
    archive = upstream_archive()
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.single_file import (SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG, TEXT_ENCODER_CONFIGS, UNET_CONFIGS,
                                     _classic_clip_names, build_models, open_clip_names, unet_to_ldm)

    ns = {"torch": torch, "math": math, "diffusers": diffusers}
    with tarfile.open(archive) as tar:
        for rel, names in (("library/model_util.py", {"reshape_weight_for_sd", "convert_vae_state_dict"}),
                           ("library/sdxl_model_util.py", {"make_unet_conversion_map", "convert_unet_state_dict",
                                                            "convert_diffusers_unet_state_dict_to_sdxl",
                                                            "convert_text_encoder_2_state_dict_to_sdxl"})):
            source = tar.extractfile(f"sd-scripts/{rel}").read().decode()
            for node in ast.parse(source).body:
                if getattr(node, "name", None) in names:
                    exec(ast.get_source_segment(source, node), ns)
    with init_empty_weights():
        unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl"])
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS["sdxl"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))
    state = {"model.diffusion_model." + k: v
             for k, v in ns["convert_diffusers_unet_state_dict_to_sdxl"](unet.state_dict()).items()}
    state.update({"conditioner.embedders.0.transformer." + k: v for k, v in _classic_clip_names(te1.state_dict()).items()})
    state.update({"conditioner.embedders.1.model." + k: v for k, v in
                  ns["convert_text_encoder_2_state_dict_to_sdxl"](_classic_clip_names(te2.state_dict()), None).items()})
    state.update({"first_stage_model." + k: v for k, v in ns["convert_vae_state_dict"](vae.state_dict()).items()})
    assert sum(v.numel() for k, v in state.items() if k.startswith("model.")) > 2_500_000_000  # the real SDXL U-Net
    parts = build_models(state, {}, "sdxl")  # strict: every weight placed, none left over
    assert parts["text_encoder_2"].config.hidden_size == 1280
    theirs = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    ours = unet_to_ldm(unet)
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    te2_ours = open_clip_names(te2)
    te2_theirs = {k[len("conditioner.embedders.1.model."):]: v for k, v in state.items()
                  if k.startswith("conditioner.embedders.1.model.")}
    assert te2_ours.keys() == te2_theirs.keys()
    assert all(te2_ours[k].shape == te2_theirs[k].shape for k in te2_ours)
    json.dumps(UNET_CONFIGS["sdxl"])  # the shipped config is plain data


def test_sdxl_sample_images(cache, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --s 2 --d 1 --w 64 --h 64\n")
    _train(tmp_path, "--sample_prompts", str(prompts), "--sample_at_first", "--sample_every_n_steps", "2",
           "--optimizer_type", "AdamW", steps=2)
    files = sorted(os.listdir(tmp_path / "sample"))
    assert [f.split("_")[1] for f in files] == ["000000", "000002"]


def test_cached_text_encoder_outputs_refuse_changing_captions_and_keep_a_prefix(cache, tmp_path, capsys):
    common = ["--network_train_unet_only", "--cache_text_encoder_outputs", "--optimizer_type", "AdamW"]
    rc = train_network.main([*_argv(tmp_path / "a"), *common, "--shuffle_caption"], sdxl=True)
    assert rc == 2 and "cannot go with captions that change" in capsys.readouterr().err
    assert _train(tmp_path / "b", *common, "--caption_prefix", "sks")["steps"] == 3  # fixed: cached as prefixed
