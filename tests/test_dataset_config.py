"""--dataset_config (sd-scripts' dataset TOML) and --reg_data_dir / --prior_loss_weight."""
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_network
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.dataset import FolderDataset, Subset, gather
from library.losses import compute_loss


def _folder(path, n, caption=True):
    path.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(path / f"{i}.png")
        if caption:
            (path / f"{i}.txt").write_text(f"a red circle, number {i}")
    return path


def test_regularisation_images_are_repeated_until_they_match_the_training_images(tmp_path):
    train = _folder(tmp_path / "train" / "2_sks dog", 3)
    reg = _folder(tmp_path / "reg" / "1_dog", 2, caption=False)
    items, info, reg_info = gather([Subset(str(train), 2, "2_sks dog", "sks dog", ".txt"),
                                    Subset(str(reg), 1, "1_dog", "dog", ".txt", is_reg=True)])
    train_items = [it for it in items if not it.is_reg]
    reg_items = [it for it in items if it.is_reg]
    assert len(train_items) == 6 and len(reg_items) == 6  # as many as the training images, with repeats
    assert sorted(it.path.rsplit("/", 1)[1] for it in reg_items) == ["0.png"] * 3 + ["1.png"] * 3
    assert {it.caption for it in reg_items} == {"dog"}  # no caption files: the class token
    assert reg_info["1_dog"]["img_count"] == 2 and info["2_sks dog"]["n_repeats"] == 2


def test_prior_loss_weight_weights_the_regularisation_samples(tmp_path):
    train = _folder(tmp_path / "train" / "1_a", 2)
    reg = _folder(tmp_path / "reg" / "1_b", 2)
    ds = FolderDataset(None, 64, subsets=[Subset(str(train), 1, "1_a", None, ".txt"),
                                          Subset(str(reg), 1, "1_b", None, ".txt", is_reg=True)])
    assert ds.num_images == 2 and ds.num_reg_images == 2
    idx = [0, 2]  # one training image, one regularisation image
    weights = ds.loss_weights(idx, 0.25)
    assert weights.tolist() == [1.0, 0.25] and ds.loss_weights([0, 1], 0.25) is None
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(compute_loss(pred, target, "l2", weights=weights), (per * weights).mean())


def _train(tiny_sd_path, tmp_path, *extra):
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--max_train_steps", "3", "--seed", "1", "--no_progress",
            "--network_dim", "4", "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--output_dir",
            str(tmp_path / "out"), "--output_name", "d", "--caption_extension", ".txt", *extra]
    rc = train_network.main(argv)
    return rc


def _metadata(tmp_path):
    with safe_open(str(tmp_path / "out" / "d.safetensors"), "pt") as f:
        return f.metadata()


def test_reg_data_dir_and_prior_loss_weight_train(tiny_sd_path, tmp_path):
    _folder(tmp_path / "train" / "2_sks dog", 3)
    _folder(tmp_path / "reg" / "1_dog", 2, caption=False)
    assert _train(tiny_sd_path, tmp_path, "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir",
                  str(tmp_path / "reg"), "--prior_loss_weight", "0.5", "--train_batch_size", "2") == 0
    md = _metadata(tmp_path)
    assert md["ss_num_reg_images"] == "2" and md["ss_num_train_images"] == "3" and md["ss_prior_loss_weight"] == "0.5"
    assert "1_dog" in json.loads(md["ss_reg_dataset_dirs"])


def test_a_dataset_config_with_general_dataset_and_subset_options_trains(tiny_sd_path, tmp_path):
    a = _folder(tmp_path / "imgs" / "a", 3)
    b = _folder(tmp_path / "imgs" / "b", 2, caption=False)
    reg = _folder(tmp_path / "imgs" / "reg", 2, caption=False)
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16

  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = "{b}"
  class_tokens = "sks dog"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "dog"
  is_reg = true
""")
    assert _train(tiny_sd_path, tmp_path, "--dataset_config", str(cfg), "--train_batch_size", "1") == 0
    md = _metadata(tmp_path)
    assert md["ss_enable_bucket"] == "True" and md["ss_num_reg_images"] == "2"
    assert md["ss_num_batches_per_epoch"] == "11"  # (9 + 2) training + 11 reg = 22 items, batch 2 from the config
    assert json.loads(md["ss_dataset_dirs"]) == {"a": {"n_repeats": 3, "img_count": 3, "missing_captions": 0},
                                                 "b": {"n_repeats": 1, "img_count": 2, "missing_captions": 2}}


@pytest.mark.parametrize("text,expect", [
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dirr = 'x'\nnum_repeat = 2\nsecondary_separator = ';'\n",
     ["image_dirr (did you mean image_dir?)", "num_repeat (did you mean num_repeats?)", "secondary_separator"]),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", ["subset 1 has no image_dir"]),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
     ["2 [[datasets]]; one is supported here"]),
    ("[[datasets]]\nbatch_size = 'two'\n[[datasets.subsets]]\nimage_dir = '{d}'\n", ["batch_size"]),
])
def test_dataset_config_mistakes_are_one_line_before_loading(tmp_path, capsys, text, expect):
    d = _folder(tmp_path / "imgs", 1)
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(text.format(d=d))
    assert train_network.main(["--dataset_config", str(cfg), "--output_dir", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    for part in expect:
        assert part in err[0], err[0]
