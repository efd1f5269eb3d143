"""Sample images: sd-scripts' prompt syntax and files, when and where they are written, their size
and seed, TensorBoard, and that sampling leaves the training random streams alone."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_network
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.errors import UserError
from library.sample_prompts import load_prompts, parse_prompt_line


def test_a_prompt_line_in_sd_scripts_syntax():
    p = parse_prompt_line("a red circle, striped --n blurry, low quality --w 512 --h 768 --s 20 --l 6.5 --d 42 --ss euler_a")
    assert p == {"prompt": "a red circle, striped", "negative_prompt": "blurry, low quality", "width": 512,
                 "height": 768, "sample_steps": 20, "scale": 6.5, "seed": 42, "sample_sampler": "euler_a"}


def test_prompt_files_txt_toml_json(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na red circle --d 1\n\na blue square\n")
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 64\nsample_steps = 2\n[[prompt.subset]]\nprompt = "a red circle"\n'
                                     'seed = 3\n[[prompt.subset]]\nprompt = "a blue square"\nwidth = 128\n')
    (tmp_path / "p.json").write_text(json.dumps(["a red circle --w 64", {"prompt": "a blue square", "seed": 9}]))
    txt, toml_, js = (load_prompts(str(tmp_path / f"p.{ext}")) for ext in ("txt", "toml", "json"))
    assert [p["prompt"] for p in txt] == ["a red circle", "a blue square"] and txt[0]["seed"] == 1
    assert toml_[0] == {"prompt": "a red circle", "width": 64, "sample_steps": 2, "seed": 3, "enum": 0}
    assert toml_[1]["width"] == 128 and js[0]["width"] == 64 and js[1]["seed"] == 9
    (tmp_path / "bad.txt").write_text("x --ss warp_drive\n")
    with pytest.raises(UserError, match="sampler 'warp_drive'"):
        load_prompts(str(tmp_path / "bad.txt"))


def _run(tiny_sd_path, tmp_path, name, *extra):
    from library.dataset_gen import make_dataset

    data = make_dataset(str(tmp_path / "data"), n_images=4, resolution=64, seed=0)
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", data, "--caption_extension", ".txt",
            "--train_batch_size", "2", "--seed", "1", "--no_progress", "--network_dim", "4", "--max_train_steps", "4",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--output_dir", str(tmp_path / name),
            "--output_name", name, *extra]
    assert train_network.main(argv) == 0
    with safe_open(str(tmp_path / name / f"{name}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_samples_at_the_asked_steps_with_size_and_seed_and_training_unchanged(tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 96 --s 2 --d 5\na blue square --s 2 --ss euler_a --d 7\n")
    plain = _run(tiny_sd_path, tmp_path, "plain")
    logs = tmp_path / "logs"
    sampled = _run(tiny_sd_path, tmp_path, "s", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
                   "--sample_at_first", "--logging_dir", str(logs))
    assert plain.keys() == sampled.keys() and all(torch.equal(plain[k], sampled[k]) for k in plain)
    files = sorted(os.listdir(tmp_path / "s" / "sample"))
    steps = sorted({f.split("_")[1] for f in files})
    assert steps == ["000000", "000002", "000004"] and len(files) == 6
    first = [f for f in files if f.startswith("s_000000_00_") and f.endswith("_5.png")]
    assert first and Image.open(tmp_path / "s" / "sample" / first[0]).size == (64, 96)  # --w / --h
    assert Image.open(tmp_path / "s" / "sample" / [f for f in files if "_01_" in f][0]).size == (64, 64)  # the run's size
    again = _run(tiny_sd_path, tmp_path, "r", "--sample_prompts", str(prompts), "--sample_at_first",
                 "--sample_every_n_steps", "100")
    assert again.keys() == plain.keys()
    redo = [f for f in os.listdir(tmp_path / "r" / "sample") if f.startswith("r_000000_00_")][0]
    a = torch.tensor(list(Image.open(tmp_path / "s" / "sample" / first[0]).getdata()))
    b = torch.tensor(list(Image.open(tmp_path / "r" / "sample" / redo).getdata()))
    assert torch.equal(a, b)  # the same seed gives the same image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(p for p in logs.rglob("events*")).parent
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    assert {"sample_00", "sample_01"} <= set(acc.Tags()["images"])


def test_epoch_samples_replace_step_samples_as_in_sd_scripts(tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 1 --d 2\n")
    _run(tiny_sd_path, tmp_path, "e", "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1",
         "--sample_every_n_steps", "1", "--max_train_epochs", "2")
    files = sorted(os.listdir(tmp_path / "e" / "sample"))
    assert [f.split("_")[1] for f in files] == ["e000001", "e000002"]


def test_a_bad_prompt_file_ends_in_one_line_before_loading(tmp_path, capsys):
    rc = train_network.main(["--sample_prompts", str(tmp_path / "none.txt"), "--output_dir", str(tmp_path)])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--sample_prompts" in err[0] and "does not exist" in err[0]


def test_a_resumed_run_with_samples_ends_with_the_uninterrupted_weights(tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 1\n")  # no seed: sampling draws fresh randomness every time
    common = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "1")
    straight = _run(tiny_sd_path, tmp_path, "a", *common)
    _run(tiny_sd_path, tmp_path, "b", *common, "--save_every_n_steps", "2", "--save_state")
    resumed = _run(tiny_sd_path, tmp_path, "c", *common, "--resume", str(tmp_path / "b" / "b-step00000002-state"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
