"""Session-wide tiny Stable Diffusion model for the tests (import the fixtures you use).

    from conftest_tiny import one_torch_thread, tiny_sd_path, tiny_models  # noqa: F401

The model is built once per pytest session under the session's base temp folder
(build_tiny_sd reuses it on every later call); `tiny_models` loads fresh copies per test,
so a test may patch them freely; `one_torch_thread` (autouse once imported) runs each test
with a single torch thread.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.tiny_sd import build_tiny_sd, load_tiny_sd  # noqa: E402

CAPTIONS = ["a red circle on a blue background", "a green square on a yellow striped background"]


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    return build_tiny_sd(str(tmp_path_factory.getbasetemp() / "tiny_sd_seed0"), seed=0)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test (autouse in the modules that import it).

    The toy model gains nothing from more, and on a shared 2-core machine OpenMP threads
    contending with other processes made single tests up to 30x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_models(tiny_sd_path):
    return load_tiny_sd(tiny_sd_path)


def encode_text(models, captions=CAPTIONS):
    ids = models.tokenizer(
        list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return models.text_encoder(ids)[0]


def fixed_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500, 900, 250][:batch])
    return latents, timesteps


def unet_output(models, captions=CAPTIONS, seed=0):
    """U-Net noise prediction on fixed latents, conditioned on the text encoder's output."""
    latents, timesteps = fixed_inputs(len(captions), seed)
    return models.unet(latents, timesteps, encoder_hidden_states=encode_text(models, captions)).sample
