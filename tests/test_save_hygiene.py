"""--save_last_n_* keep what sd-scripts keeps, and saved models get the user's umask."""
import os
import stat

import train_network
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)


def _run(tiny_sd_path, tmp_path, *extra):
    from library.dataset_gen import make_dataset

    data = make_dataset(str(tmp_path / "data"), n_images=4, resolution=64, seed=0)
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", data, "--caption_extension", ".txt",
            "--train_batch_size", "2", "--seed", "1", "--no_progress", "--network_dim", "4",
            "--output_dir", str(tmp_path / "out"), "--output_name", "h", "--save_state", *extra]
    assert train_network.main(argv) == 0
    return sorted(os.listdir(tmp_path / "out"))


def test_save_last_n_steps_and_its_state_form(tiny_sd_path, tmp_path):
    files = _run(tiny_sd_path, tmp_path, "--max_train_steps", "6", "--save_every_n_steps", "1",
                 "--save_last_n_steps", "2", "--save_last_n_steps_state", "1")
    models = [f for f in files if f.startswith("h-step") and f.endswith(".safetensors")]
    states = [f for f in files if f.startswith("h-step") and f.endswith("-state")]
    assert models == ["h-step00000003.safetensors", "h-step00000004.safetensors", "h-step00000005.safetensors"]
    assert states == ["h-step00000004-state", "h-step00000005-state"]


def test_save_last_n_epochs(tiny_sd_path, tmp_path):
    files = _run(tiny_sd_path, tmp_path, "--max_train_epochs", "4", "--save_every_n_epochs", "1",
                 "--save_last_n_epochs", "2")
    assert [f for f in files if f.endswith(".safetensors")] == ["h-000002.safetensors", "h-000003.safetensors",
                                                                "h.safetensors"]
    assert [f for f in files if f.endswith("-state") and f.startswith("h-0")] == ["h-000002-state", "h-000003-state"]


def test_model_files_get_the_users_umask(tiny_sd_path, tmp_path):
    old = os.umask(0o022)
    try:
        _run(tiny_sd_path, tmp_path, "--max_train_steps", "1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "h.safetensors").st_mode) == 0o644


def test_dim_from_weights_writes_the_true_dim_and_alpha(tiny_sd_path, tmp_path):
    from safetensors import safe_open

    _run(tiny_sd_path, tmp_path, "--max_train_steps", "1", "--network_dim", "6", "--network_alpha", "3")
    start = tmp_path / "start.safetensors"
    os.replace(tmp_path / "out" / "h.safetensors", start)
    _run(tiny_sd_path, tmp_path, "--max_train_steps", "1", "--network_weights", str(start), "--dim_from_weights")
    with safe_open(str(tmp_path / "out" / "h.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "6" and md["ss_network_alpha"] == "3.0"


def test_cache_latents_to_disk_writes_npz_files_and_reuses_them(tiny_sd_path, tmp_path):
    from safetensors import safe_open

    def weights():
        with safe_open(str(tmp_path / "out" / "h.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    _run(tiny_sd_path, tmp_path, "--max_train_steps", "2", "--cache_latents")
    in_memory = weights()
    _run(tiny_sd_path, tmp_path, "--max_train_steps", "2", "--cache_latents_to_disk")
    images = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    npz = sorted(p for p in os.listdir(images) if p.endswith(".npz"))
    assert len(npz) == 4
    first = weights()
    stamp = {p: os.path.getmtime(images / p) for p in npz}
    _run(tiny_sd_path, tmp_path, "--max_train_steps", "2", "--cache_latents_to_disk")
    assert {p: os.path.getmtime(images / p) for p in npz} == stamp  # reused, not rewritten
    import torch

    assert all(torch.equal(first[k], weights()[k]) for k in first)
    assert all(torch.equal(first[k], in_memory[k]) for k in first)  # the same latents as in memory
