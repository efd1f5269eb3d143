"""Loss options of the trainer (spec/algorithms.md section 15)."""
import pytest
import torch

from library.losses import base_loss, compute_loss, fft_magnitude_loss, is_latent_space


def test_fft_loss_zero_for_identical_and_shift_invariant():
    x = torch.randn(2, 4, 16, 16)
    assert float(fft_magnitude_loss(x, x)) == 0.0
    shifted = torch.roll(x, shifts=(3, 5), dims=(-2, -1))  # phase-only change
    assert float(fft_magnitude_loss(x, shifted)) < 1e-5
    assert float(fft_magnitude_loss(x, 2 * x)) > 0.1


def test_fft_loss_finite_gradient_at_zero_and_channel_agnostic():
    for c in (3, 4, 16):
        z = torch.zeros(1, c, 8, 8, requires_grad=True)
        fft_magnitude_loss(z, torch.randn(1, c, 8, 8)).backward()
        assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("kind", ["l2", "l1", "huber"])
def test_base_losses(kind):
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    expected = {"l2": 4.0, "l1": 2.0, "huber": 2 * 0.1 * ((4 + 0.01) ** 0.5 - 0.1)}[kind]
    assert float(base_loss(a, b, kind)) == pytest.approx(expected, rel=1e-5)
    assert float(base_loss(a, a, kind)) == 0.0


def test_fourier_mixes_in_with_warmup():
    pred, tgt = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    l2 = float(base_loss(pred, tgt, "l2"))
    early = float(compute_loss(pred, tgt, "fourier", step=0, fourier_weight=0.5, fourier_warmup_steps=10))
    late = float(compute_loss(pred, tgt, "fourier", step=100, fourier_weight=0.5, fourier_warmup_steps=10))
    off = float(compute_loss(pred, tgt, "fourier", step=100, fourier_active=False))
    assert l2 < early < late and off == pytest.approx(l2)


def test_latent_space_detection():
    assert is_latent_space(torch.zeros(1, 4, 8, 8), 4, 8, 64)
    assert not is_latent_space(torch.zeros(1, 3, 64, 64), 4, 8, 64)
    assert not is_latent_space(torch.zeros(1, 4, 64, 64), 4, 8, 64)
