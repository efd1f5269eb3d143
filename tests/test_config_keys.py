"""kohya configs and command lines: every unknown key named at once, sd-scripts options we lack
told apart from typos, suggestions only when the meaning matches, and the sd-scripts options and
spellings real configs use accepted."""
import ast
import os
import tarfile

import pytest
from safetensors import safe_open

import train_network
from helpers import upstream_archive
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.config_util import describe_unknown, suggest
from library.sd_scripts_options import FILES, OPTIONS
from library.train_args import setup_parser

KNOWN = [s[2:] for a in setup_parser()._actions for s in a.option_strings if s.startswith("--")]


def test_the_upstream_option_list_is_what_sd_scripts_declares():
    archive = upstream_archive()
    names = set()
    with tarfile.open(archive) as tar:
        for rel in FILES:
            tree = ast.parse(tar.extractfile(f"sd-scripts/{rel}").read().decode())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                    names |= {a.value[2:] for a in node.args
                              if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")}
    assert names == set(OPTIONS)


@pytest.mark.parametrize("typo,meant", [("learnign_rate", "learning_rate"), ("max_train_stepz", "max_train_steps"),
                                        ("save_every_n_epoch", "save_every_n_epochs"), ("network_dimm", "network_dim"),
                                        ("load_every_n_epochs", None), ("min_bucket_res", "min_bucket_reso"),
                                        ("text_encoder_lrr", "text_encoder_lr"), ("sample_promts", "sample_prompts"), ("mix_bucket_reso", None)])
def test_a_suggestion_is_offered_only_when_the_meaning_matches(typo, meant):
    assert suggest(typo, KNOWN) == meant


def test_all_unknown_keys_of_a_config_are_named_in_one_message(tmp_path, capsys):
    cfg = tmp_path / "kohya.toml"
    cfg.write_text('[a]\nlearnign_rate = 1e-4\nip_noise_gamma = 0.1\nzero_terminal_snr = true\n'
                   '[b]\nmy_own_key = 3\nmax_train_stepz = 10\n')
    assert train_network.main(["--config_file", str(cfg), "--output_dir", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    for part in ("does not support: ip_noise_gamma, zero_terminal_snr", "learnign_rate (did you mean learning_rate?)",
                 "my_own_key", "max_train_stepz (did you mean max_train_steps?)"):
        assert part in err[0], err[0]


def test_describe_unknown_is_empty_without_unknowns():
    assert describe_unknown([], KNOWN) == ""


def test_a_kohya_style_config_with_sd_scripts_spellings_runs_first_time(tiny_sd_path, tmp_path):
    """Options real kohya_ss configs carry: the old caption_extention spelling, attention and
    data-loader switches, the adafactor schedule with Adafactor, buckets, augmentations, caption
    options, sample images, pruned periodic saves, metadata fields, a timestamped log dir."""
    from library.dataset_gen import make_dataset

    data = make_dataset(str(tmp_path / "data"), n_images=4, resolution=64, seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 2 --d 1\n")
    cfg = tmp_path / "kohya_ss.toml"
    cfg.write_text(f'''
pretrained_model_name_or_path = "{tiny_sd_path}"
train_data_dir = "{data}"
caption_extention = ".txt"
output_dir = "{tmp_path / 'out'}"
output_name = "k"
logging_dir = "{tmp_path / 'logs'}"
log_prefix = "run-"
xformers = true
sdpa = true
mem_eff_attn = true
lowram = true
max_data_loader_n_workers = 0
persistent_data_loader_workers = true
optimizer_type = "Adafactor"
optimizer_args = ["scale_parameter=False", "relative_step=True", "warmup_init=False"]
lr_scheduler = "adafactor"
learning_rate = 1e-4
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
max_train_steps = 3
train_batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
flip_aug = true
color_aug = true
random_crop = true
shuffle_caption = true
keep_tokens = 1
caption_tag_dropout_rate = 0.1
caption_dropout_rate = 0.05
max_token_length = 150
sample_prompts = "{prompts}"
sample_every_n_steps = 2
sample_sampler = "euler_a"
save_every_n_steps = 1
save_last_n_steps = 1
save_state = true
metadata_title = "My LoRA"
metadata_author = "me"
metadata_tags = "style, test"
no_progress = true
seed = 1
''')
    assert train_network.main(["--config_file", str(cfg)]) == 0
    with safe_open(str(tmp_path / "out" / "k.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.title"] == "My LoRA" and md["modelspec.author"] == "me" and md["modelspec.tags"] == "style, test"
    assert md["ss_caption_extension"] == ".txt"
    assert len(os.listdir(tmp_path / "out" / "sample")) == 1  # at step 2 of 3
    saves = sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("k-step"))
    assert saves == ["k-step00000001-state", "k-step00000001.safetensors", "k-step00000002-state",
                     "k-step00000002.safetensors"]  # --save_last_n_steps 1: at step 2, steps 1-2 are "the last"
    runs = [p.name for p in (tmp_path / "logs").iterdir()]
    assert len(runs) == 1 and runs[0].startswith("run-")  # one timestamped folder per run, as sd-scripts


def test_use_8bit_adam_and_a_custom_scheduler_class(tiny_sd_path, tmp_path, capsys):
    from library.dataset_gen import make_dataset

    data = make_dataset(str(tmp_path / "data"), n_images=4, resolution=64, seed=0)
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", data, "--caption_extension",
              ".txt", "--output_dir", str(tmp_path / "o"), "--max_train_steps", "2", "--no_progress",
              "--network_dim", "4"]
    assert train_network.main([*common, "--use_8bit_adam", "--optimizer_type", "AdamW"]) == 2
    assert "--use_8bit_adam and --optimizer_type exclude each other" in capsys.readouterr().err
    assert train_network.main([*common, "--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR",
                               "--lr_scheduler_args", "step_size=1", "gamma=0.5"]) == 0
    assert train_network.main([*common, "--lr_scheduler_type", "nope.Sched"]) == 2
    assert "--lr_scheduler_type 'nope.Sched' cannot be imported" in capsys.readouterr().err
    assert train_network.main([*common, "--lr_scheduler", "adafactor"]) == 2
    assert "--lr_scheduler adafactor goes with --optimizer_type Adafactor" in capsys.readouterr().err
