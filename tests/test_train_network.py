"""train_network.py end to end on the embedded tiny SD model (CPU, a few steps each)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import library.trainer as trainer_mod
import train_network
from helpers import cache_dir_env
from library.optimizers.registry import list_optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache with the tiny model and the generated dataset, built once."""
    from library.dataset_gen import make_dataset
    from library.tiny_sd import build_tiny_sd

    d = tmp_path_factory.mktemp("cache")
    build_tiny_sd(str(d / "tiny-sd"), seed=0)
    make_dataset(str(d / "demo-data"), n_images=16, resolution=64, seed=0)  # what the trainer generates
    with cache_dir_env(d):
        yield d


def run(tmp_path, *extra, steps=3, name="t", expect=0):
    argv = ["--max_train_steps", str(steps), "--train_batch_size", "2", "--seed", "1", "--no_progress",
            "--output_dir", str(tmp_path), "--output_name", name, "--caption_extension", ".txt",
            "--network_dim", "4", "--network_alpha", "4", *extra]
    rc = train_network.main(argv)
    assert rc == expect
    return os.path.join(str(tmp_path), name + ".safetensors")


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


OPTIMIZERS = [info.name for info in list_optimizers()]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("module", ["networks.lora", "networks.lokr"])
def test_every_registered_optimizer_trains_lora_and_lokr(cache, tmp_path, optimizer, module):
    out = run(tmp_path, "--optimizer_type", optimizer, "--learning_rate", "1e-3", "--network_module", module)
    tensors, md = _tensors(out)
    assert tensors and md["ss_network_module"] == module
    assert md["ss_optimizer"].startswith("library.")


def test_saved_lora_loads_back_and_changes_output(cache, tmp_path):
    out = run(tmp_path, "--optimizer_type", "AdaptiveHinaAdamW", "--learning_rate", "5e-3", steps=4)
    tensors, md = _tensors(out)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_optimizer", "ss_session_id",
                "ss_training_started_at", "ss_num_train_images", "ss_max_train_steps", "ss_lr_scheduler",
                "ss_seed", "ss_steps", "ss_tag_frequency", "ss_dataset_dirs", "sshs_model_hash", "sshs_legacy_hash"):
        assert key in md, key
    assert md["ss_network_dim"] == "4" and md["ss_steps"] == "4"
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in tensors.items())

    from library.tiny_sd import load_tiny_sd
    from networks import lora

    sd = load_tiny_sd(str(cache / "tiny-sd"))
    torch.manual_seed(0)
    lat = torch.randn(1, 4, 8, 8)
    ids = sd.tokenizer(["a red circle"], padding="max_length", max_length=sd.tokenizer.model_max_length,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        before = sd.unet(lat, torch.tensor([10]), sd.text_encoder(ids)[0]).sample
        net, _ = lora.create_network_from_weights(1.0, out, sd.vae, sd.text_encoder, sd.unet)
        net.apply_to(sd.text_encoder, sd.unet)
        net.load_weights(out)
        after = sd.unet(lat, torch.tensor([10]), sd.text_encoder(ids)[0]).sample
    assert not torch.allclose(before, after)


def test_optimizer_receives_a_name_for_every_parameter(cache, tmp_path):
    args = train_network.setup_one_line_parser().parse_args(
        ["--max_train_steps", "1", "--no_progress", "--output_dir", str(tmp_path), "--caption_extension", ".txt",
         "--optimizer_type", "AdaptiveHinaAdamW", "--network_args", "loraplus_lr_ratio=4"])
    summary = trainer_mod.train(args, trainer_mod.prepare(args))
    opt = summary["optimizer_object"]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(opt.param_name(p) for p in params)
    assert opt.get_relationship_summary()["method"] == "names"
    assert opt.get_relationship_summary()["total_relationships"] == len(params) // 2


def test_lycoris_kohya_gets_names_too(cache, tmp_path):
    args = train_network.setup_one_line_parser().parse_args(
        ["--max_train_steps", "1", "--no_progress", "--output_dir", str(tmp_path), "--caption_extension", ".txt",
         "--optimizer_type", "AdaptiveHinaAdamW", "--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "preset=attn-mlp"])
    summary = trainer_mod.train(args, trainer_mod.prepare(args))
    opt = summary["optimizer_object"]
    names = [opt.param_name(p) for g in opt.param_groups for p in g["params"]]
    assert names and all(names) and any("lokr_w1" in n for n in names)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0") for n in names)  # classic kohya names


def test_resume_is_bit_exact(cache, tmp_path):
    common = ["--optimizer_type", "AdaptiveHinaAdamW", "--learning_rate", "2e-3", "--lr_scheduler", "cosine",
              "--optimizer_args", "warmup_steps=3", "relationship_discovery_interval=2"]
    straight = run(tmp_path / "a", *common, steps=6, name="a")
    run(tmp_path / "b", *common, "--save_every_n_steps", "3", "--save_state", steps=6, name="b")
    state = tmp_path / "b" / "b-step00000003-state"
    assert (state / "train_state.json").is_file()
    resumed = run(tmp_path / "c", *common, "--resume", str(state), steps=6, name="c")
    ta, _ = _tensors(straight)
    tc, _ = _tensors(resumed)
    assert ta.keys() == tc.keys()
    for k in ta:
        assert torch.equal(ta[k], tc[k]), k


def test_every_preset_parses_and_trains(cache, tmp_path):
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                     if f.endswith(".toml") and not f.startswith("sdxl_"))  # those: tests/test_sdxl.py
    assert presets
    for i, preset in enumerate(presets):
        out = run(tmp_path / str(i), "--config_file", os.path.join(ROOT, "configs", preset), steps=2, name=f"p{i}")
        assert os.path.isfile(out), preset


def test_command_line_overrides_toml(cache, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[x]\noptimizer_type = "AdamW"\nlearning_rate = 1e-2\nnetwork_dim = 2\n')
    out = run(tmp_path, "--config_file", str(cfg), "--network_dim", "4")
    _, md = _tensors(out)
    assert md["ss_network_dim"] == "4" and md["ss_learning_rate"] == "0.01"
    assert md["ss_optimizer"].startswith("torch.optim.adamw.AdamW")


def test_output_config_round_trip(cache, tmp_path):
    cfg = tmp_path / "out.toml"
    assert train_network.main(["--config_file", str(cfg), "--output_config", "--network_dim", "8",
                               "--optimizer_type", "AdaptiveHinaAdamW", "--optimizer_args", "use_lr_mask=False"]) == 0
    text = cfg.read_text()
    assert "network_dim = 8" in text and "AdaptiveHinaAdamW" in text


def test_fourier_loss_disabled_on_latents_unless_forced(cache, tmp_path, caplog):
    run(tmp_path / "a", "--loss_type", "fourier", steps=1)
    assert "latent space" in caplog.text
    caplog.clear()
    run(tmp_path / "b", "--loss_type", "fourier", "--fourier_latent_ok", steps=1)
    assert "latent space" not in caplog.text


def test_tensorboard_logs_optimizer_diagnostics(cache, tmp_path):
    logdir = tmp_path / "logs"
    run(tmp_path, "--optimizer_type", "AdaptiveHinaAdamW", "--logging_dir", str(logdir),  # as sd-scripts: enough
        "--optimizer_log_every", "1", steps=2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [os.path.join(r, f) for r, _, fs in os.walk(logdir) for f in fs if f.startswith("events")]
    assert files
    acc = EventAccumulator(os.path.dirname(files[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/current" in tags and "optimizer/lr_mask_mean" in tags and "optimizer/relationships" in tags


# ---------------------------------------------------------- user mistakes
def _cli(args, env_cache):
    env = dict(os.environ, HINA_CACHE_DIR=str(env_cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_network.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "bad_toml", "unknown_module", "unknown_optimizer",
                                  "unknown_optimizer_arg", "bad_optimizer_value", "unknown_toml_key", "bad_flag"])
def test_user_mistakes_exit_2_with_one_line_before_loading(tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    toml_bad = tmp_path / "bad.toml"
    toml_bad.write_text('optimizer_type = "AdamW"\nlearning_rate = = 3\n')
    toml_unknown = tmp_path / "unk.toml"
    toml_unknown.write_text('[a]\nlearning_rat = 1e-3\n')
    args = {
        "missing_data": ["--train_data_dir", str(tmp_path / "nope")],
        "empty_data": ["--train_data_dir", str(empty)],
        "bad_toml": ["--config_file", str(toml_bad)],
        "unknown_module": ["--network_module", "networks.nope"],
        "unknown_optimizer": ["--optimizer_type", "AdamQ"],
        "unknown_optimizer_arg": ["--optimizer_type", "AdaptiveHinaAdamW", "--optimizer_args", "warmup_step=3"],
        "bad_optimizer_value": ["--optimizer_type", "AdaptiveHinaAdamW", "--optimizer_args", "betas=0.9,1.2"],
        "unknown_toml_key": ["--config_file", str(toml_unknown)],
        "bad_flag": ["--max_train_stepz", "3"],
    }[case]
    cache_dir = tmp_path / "cache"
    res = _cli(args, cache_dir)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (cache_dir / "tiny-sd").exists()  # nothing was loaded or built
    expect = {"bad_toml": "line 2", "unknown_optimizer_arg": "warmup_steps", "unknown_toml_key": "learning_rate",
              "bad_optimizer_value": "betas", "unknown_module": "networks.nope", "missing_data": "nope"}.get(case)
    if expect:
        assert expect in err[0]


def test_non_finite_losses_are_skipped_then_stop_with_a_saved_state(cache, tmp_path, monkeypatch, capsys):
    real = trainer_mod.DiffusionLoss.__call__
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(trainer_mod.DiffusionLoss, "__call__", flaky)
    rc = train_network.main(["--max_train_steps", "20", "--train_batch_size", "1", "--seed", "1", "--no_progress",
                             "--output_dir", str(tmp_path), "--output_name", "n", "--caption_extension", ".txt",
                             "--max_bad_steps", "3", "--optimizer_type", "AdaptiveHinaAdamW"])
    assert rc == 1  # not an argument mistake (2): a stop after saving
    err = capsys.readouterr().err
    assert "3 consecutive non-finite losses" in err and "at step 2" in err
    assert (tmp_path / "n-interrupted.safetensors").is_file()
    assert (tmp_path / "n-interrupted-state" / "train_state.json").is_file()
    weights, _ = _tensors(str(tmp_path / "n-interrupted.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_without_seed_reuses_the_saved_seed(cache, tmp_path):
    common = ["--optimizer_type", "AdaptiveHinaAdamW", "--max_train_steps", "4", "--train_batch_size", "2",
              "--no_progress", "--caption_extension", ".txt", "--network_dim", "4"]
    assert train_network.main([*common, "--output_dir", str(tmp_path / "a"), "--save_every_n_steps", "2",
                               "--save_state", "--output_name", "a"]) == 0
    state = tmp_path / "a" / "a-step00000002-state"
    saved_seed = json.loads((state / "train_state.json").read_text())["seed"]
    args = train_network.setup_one_line_parser().parse_args([*common, "--output_dir", str(tmp_path / "b"),
                                                             "--resume", str(state)])
    assert trainer_mod.prepare(args).seed == saved_seed


def test_bf16_epochs_checkpointing_and_lr_warmup(cache, tmp_path):
    """In a fresh process: accelerate fixes mixed precision once per process."""
    res = _cli(["--optimizer_type", "AdaptiveHinaAdamW", "--mixed_precision", "bf16", "--max_train_epochs", "1",
                "--gradient_checkpointing", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.5",
                "--gradient_accumulation_steps", "2", "--train_batch_size", "2", "--seed", "1", "--no_progress",
                "--output_dir", str(tmp_path), "--output_name", "b", "--caption_extension", ".txt",
                "--network_dim", "4"], cache)
    assert res.returncode == 0, res.stderr[-2000:]
    tensors, md = _tensors(str(tmp_path / "b.safetensors"))
    # 16 images x 2 repeats, batch 2, accumulation 2: 8 optimizer steps in one epoch
    assert md["ss_steps"] == "8" and md["ss_num_epochs"] == "1" and md["ss_mixed_precision"] == "bf16"
    assert md["ss_lr_warmup_steps"] == "4"
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())


SIGNAL_RUN = ["--train_batch_size", "1", "--seed", "1", "--no_progress", "--output_name", "s",
              "--caption_extension", ".txt", "--network_dim", "4", "--optimizer_type", "AdaptiveHinaAdamW"]


def _stop_with_signal(cache, out_dir, signum):
    """Start a long run, send ``signum`` once its first periodic save exists; (exit code, stderr)."""
    import time

    env = dict(os.environ, HINA_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_network.py"), *SIGNAL_RUN,
                             "--output_dir", str(out_dir), "--max_train_steps", "100000", "--save_every_n_steps", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out_dir / "s-step00000002.safetensors").exists():
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_saves_lora_and_state_then_exits(cache, tmp_path):
    import signal

    code, err = _stop_with_signal(cache, tmp_path, signal.SIGTERM)
    assert code == 143, err[-2000:]  # 128 + SIGTERM, as a shell reports it
    assert "SIGTERM" in err
    assert (tmp_path / "s-interrupted.safetensors").is_file()
    state = json.loads((tmp_path / "s-interrupted-state" / "train_state.json").read_text())
    assert state["global_step"] >= 2


def test_two_processes_stay_in_sync_and_match_one_process(cache, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 1 each == 1 process with batch 2, within 1e-4."""
    common = ["--max_train_steps", "4", "--seed", "1", "--no_progress", "--caption_extension", ".txt",
              "--network_dim", "4", "--optimizer_type", "AdamW", "--learning_rate", "1e-3"]
    env = dict(os.environ, HINA_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517",
                          os.path.join(ROOT, "train_network.py"), *common, "--train_batch_size", "1",
                          "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=170)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in two.stderr
    one = _cli([*common, "--train_batch_size", "2", "--output_dir", str(tmp_path / "one")], cache)
    assert one.returncode == 0, one.stderr[-2000:]
    a, _ = _tensors(str(tmp_path / "one" / "last.safetensors"))
    b, _ = _tensors(str(tmp_path / "two" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), k


def test_optimizer_phases_longer_than_half_the_run_are_reported(caplog):
    import logging

    import torch

    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
    from library.trainer import warn_if_optimizer_phases_cover_the_run

    opt = AdaptiveHinaAdamW([torch.nn.Parameter(torch.zeros(2))], warmup_steps=500, wd_transition_steps=300)
    with caplog.at_level(logging.WARNING, logger="train_network"):
        warn_if_optimizer_phases_cover_the_run(opt, 2000)
        assert not caplog.records
        warn_if_optimizer_phases_cover_the_run(opt, 800)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "warmup_steps=500 is more than half the run" in msg and "wd_transition_steps" not in msg
    warn_if_optimizer_phases_cover_the_run(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), 10)


def test_automagic_below_its_lr_range_without_the_hypergradient_scale_is_reported(caplog):
    import logging

    import torch

    from library.optimizers.automagic import Automagic_CameAMP, Automagic_CameAMP8bit
    from library.trainer import warn_if_lr_is_low_for_automagic

    def groups(*lrs):
        return [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": lr} for lr in lrs]

    with caplog.at_level(logging.WARNING, logger="train_network"):
        warn_if_lr_is_low_for_automagic(Automagic_CameAMP(groups(1e-3, 1e-5)))  # the main group at 1e-3
        warn_if_lr_is_low_for_automagic(Automagic_CameAMP(groups(1e-4), use_hypergrad=True))
        warn_if_lr_is_low_for_automagic(torch.optim.AdamW(groups(1e-5)))
        assert not caplog.records
        warn_if_lr_is_low_for_automagic(Automagic_CameAMP8bit(groups(1e-4, 5e-5)))
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "Automagic_CameAMP8bit at lr 0.0001 with use_hypergrad=False" in msg and "use_hypergrad=True" in msg


# ------------------------------------------------- reliability: nothing a user does loses training
def _corrupt_dataset(root, truncated=True):
    """A kohya dataset of two images whose second one is cut short (or is not an image at all)."""
    import numpy as np
    from PIL import Image

    folder = root / "2_thing"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a thing")
    bad = folder / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if truncated else b"not an image at all")
    return root, bad


@pytest.mark.parametrize("case", ["output_dir_unwritable", "logging_dir_unwritable", "real_model_without_data",
                                  "network_dim_0", "network_dim_negative", "unknown_torch_optimizer_arg",
                                  "misspelled_optimizer_type", "truncated_image", "not_an_image"])
def test_more_mistakes_end_in_one_line_before_any_model_loads(tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a folder")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    args = {
        "output_dir_unwritable": ["--output_dir", str(blocker / "out")],
        "logging_dir_unwritable": ["--logging_dir", str(blocker / "logs")],
        "real_model_without_data": ["--pretrained_model_name_or_path", str(model)],
        "network_dim_0": ["--network_dim", "0"],
        "network_dim_negative": ["--network_dim", "-4"],
        "unknown_torch_optimizer_arg": ["--optimizer_type", "AdamW", "--optimizer_args", "weight_decya=0.1"],
        "misspelled_optimizer_type": ["--optimizer_type", "AdaptiveHinaAdamV"],
        "truncated_image": ["--train_data_dir", str(_corrupt_dataset(tmp_path / "d1")[0])],
        "not_an_image": ["--train_data_dir", str(_corrupt_dataset(tmp_path / "d2", truncated=False)[0])],
    }[case]
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    cache_dir = tmp_path / "cache"
    res = _cli(args, cache_dir)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in res.stderr, res.stderr
    assert not (cache_dir / "tiny-sd").exists()  # nothing was loaded or built
    expect = {
        "output_dir_unwritable": "--output_dir", "logging_dir_unwritable": "--logging_dir",
        "real_model_without_data": "--train_data_dir is required", "network_dim_0": "--network_dim must be >= 1",
        "network_dim_negative": "got -4", "unknown_torch_optimizer_arg": "did you mean 'weight_decay'",
        "misspelled_optimizer_type": "did you mean 'AdaptiveHinaAdamW'", "truncated_image": "1.png",
        "not_an_image": "1.png",
    }[case]
    assert expect in err[0], err[0]


def test_an_image_that_breaks_mid_run_saves_lora_and_state_first(cache, tmp_path, capsys, monkeypatch):
    """The images are verified up front; one that breaks afterwards (replaced while training) still
    ends in one line, after the LoRA and the state were saved."""
    import library.dataset as dataset_mod
    from PIL import Image

    data, bad = _corrupt_dataset(tmp_path / "d")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(bad)  # readable when the run starts ...
    original = dataset_mod.load_image

    def cut_short_later(path, *rest, **kw):
        if path == str(bad):  # ... cut short by the time training reaches it
            bad.write_bytes(b"cut")
        return original(path, *rest, **kw)

    monkeypatch.setattr(dataset_mod, "load_image", cut_short_later)
    rc = train_network.main(["--max_train_steps", "6", "--train_batch_size", "1", "--seed", "1", "--no_progress",
                             "--output_dir", str(tmp_path / "out"), "--output_name", "m", "--caption_extension",
                             ".txt", "--network_dim", "4", "--train_data_dir", str(data),
                             "--optimizer_type", "AdaptiveHinaAdamW"])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "1.png" in err[0] and "m-interrupted-state" in err[0], err
    assert (tmp_path / "out" / "m-interrupted.safetensors").is_file()
    assert (tmp_path / "out" / "m-interrupted-state" / "train_state.json").is_file()


def test_resume_refuses_another_optimizer_and_a_kohya_state_folder(cache, tmp_path):
    common = ["--max_train_steps", "2", "--train_batch_size", "2", "--seed", "1", "--no_progress",
              "--caption_extension", ".txt", "--network_dim", "4"]
    assert train_network.main([*common, "--optimizer_type", "AdaptiveHinaAdamW", "--save_state",
                               "--output_dir", str(tmp_path / "a"), "--output_name", "a"]) == 0
    state = tmp_path / "a" / "a-state"
    cases = {
        "another optimizer": (["--optimizer_type", "Automagic_CameAMP", "--resume", str(state)],
                              "saved by library.optimizers.adaptive_hina.AdaptiveHinaAdamW"),
        "8-bit state": (["--optimizer_type", "HinaAdaptiveAdamW8bit", "--resume", str(state)], "32-bit"),
    }
    kohya = tmp_path / "kohya-state"
    kohya.mkdir()
    (kohya / "train_state.json").write_text(json.dumps({"current_epoch": 3, "current_step": 120}))
    cases["kohya"] = (["--optimizer_type", "AdaptiveHinaAdamW", "--resume", str(kohya)], "kohya sd-scripts state")
    for what, (extra, expect) in cases.items():
        res = _cli([*common, *extra, "--output_dir", str(tmp_path / "b")], cache)
        assert res.returncode == 2, (what, res.stderr[-2000:])
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and expect in err[0], (what, err)


def test_sigint_exits_130_and_a_finished_resume_removes_the_interrupted_files(cache, tmp_path):
    import signal

    code, err = _stop_with_signal(cache, tmp_path, signal.SIGINT)
    assert code == 130, err[-2000:]  # 128 + SIGINT
    state = tmp_path / "s-interrupted-state"
    step = json.loads((state / "train_state.json").read_text())["global_step"]
    assert (tmp_path / "s-interrupted.safetensors").is_file()
    assert train_network.main([*SIGNAL_RUN, "--output_dir", str(tmp_path), "--max_train_steps", str(step + 2),
                               "--resume", str(state)]) == 0
    assert (tmp_path / "s.safetensors").is_file()
    assert not (tmp_path / "s-interrupted.safetensors").exists() and not state.exists()
