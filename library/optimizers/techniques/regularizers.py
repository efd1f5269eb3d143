"""Gradient regularisers of the refactored Automagic_CameAMP (seed 004), as tensor functions.

Where each one means something (and is applied; elsewhere it is the identity):

- *image-space* regularisers act on tensors with a spatial kernel: ``ndim >= 3`` and both
  trailing dims >= 3, e.g. a 3x3 conv weight ``(out, in, 3, 3)`` or a LoCon down factor
  ``(r, in, 3, 3)``. Each ``(kh, kw)`` slice is one small "image". Linear weights, 1x1
  convs (every SD1.5 LoRA factor kohya trains by default) and vectors have no spatial
  axes, so a Laplacian or an FFT over them would be meaningless: they are left alone.
  * edge suppression: L = Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of the gradient (replicate
    padding, so constant kernels have no edges); e = |L| / (4 max|g|) per tensor (1 is the
    Laplacian of an isolated spike of the largest magnitude, an absolute scale, so
    round-off on a flat kernel never counts as an edge);
    g <- g * max(1 - penalty * 1[e > threshold], floor).
  * frequency penalty: G = rfft2(g) (orthonormal), r = radial frequency / its maximum;
    G <- G * max(1 - strength * r^2, floor); g = irfft2(G). The DC term is untouched.
  * spatial awareness: per kernel k, v_k = spatial variance of g_k, rho = v_k / mean(v);
    f = min(1, sqrt(2 / (1 + rho))) (1 at average variance, smaller for spiky kernels);
    g_k <- g_k * max(1 - strength (1 - f), floor).
  * background: kernels whose gradient energy mean(g_k^2) is below
    ``threshold * mean_k`` carry no signal; g_k <- g_k * (1 - penalty).
  ``floor`` is the config's ``detail_preservation``: no image-space regulariser removes
  more than 1 - floor of any coefficient.

- *low-rank* regularisers act on the matrix view ``(shape[0], numel / shape[0])`` of any
  tensor with ndim >= 2 and both view sides >= 2 (LoRA / LoKr factors, full weights).
  From the current weight W (refreshed every ``interval`` steps) we keep a small operator
  for its *tail*, the directions with small singular values:
      small side <= max_dim: eigh of the Gram matrix on the small side gives U, sigma;
          w_i = 1 - sigma_i / sigma_max;  P = U diag(w) U^T   (side x side)
          tail(X) = P X (small side = rows) or X P (small side = cols)
      otherwise (full fine-tuning of a big matrix): a seeded randomized range finder gives
          the top-k left singular vectors U_k;  tail(X) = X - U_k U_k^T X
  * low-rank penalty:     g <- g + strength * ||g|| * T / ||T||,  T = tail(W)
    (a scale-free push that shrinks the small singular values; T = 0 when W = 0)
  * rank-aware decay:     p <- p - lr * wd * boost * tail(W)
    (the tail decays at wd (1 + boost w_i), the leading directions at wd)
  * low-rank emphasis:    x <- e x - (e - 1) tail(x)   on the momentum input
    (components along the leading singular directions are scaled by up to e)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "is_spatial",
    "lowrank_view",
    "edge_suppress_",
    "frequency_penalty_",
    "spatial_awareness_",
    "background_",
    "tail_operator",
    "apply_tail",
]

TINY = 1e-30
MATRIX_MAX = 64  # kernels up to 8x8 use the precomputed linear-operator form
_CACHE: dict = {}


def is_spatial(shape, min_kernel: int = 3) -> bool:
    shape = tuple(shape)
    return len(shape) >= 3 and shape[-1] >= min_kernel and shape[-2] >= min_kernel


def lowrank_view(shape) -> tuple[int, int] | None:
    """The (rows, cols) matrix view if both sides are >= 2, else None."""
    shape = tuple(shape)
    if len(shape) < 2:
        return None
    rows, cols = shape[0], math.prod(shape[1:])
    return (rows, cols) if min(rows, cols) >= 2 else None


def _kernels(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1, g.shape[-2], g.shape[-1])


def _laplacian(device, dtype):
    key = ("lap", device, dtype)
    k = _CACHE.get(key)
    if k is None:
        k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=dtype, device=device)
        k = _CACHE[key] = k.view(1, 1, 3, 3)
    return k


def _laplacian_direct(x: torch.Tensor) -> torch.Tensor:
    """Laplacian with replicate padding of a batch of kernels (N, kh, kw)."""
    x = x.unsqueeze(1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _laplacian(x.device, x.dtype)).squeeze(1)


def _basis(kh: int, kw: int, device) -> torch.Tensor:
    return torch.eye(kh * kw, device=device, dtype=torch.float32).view(kh * kw, kh, kw)


def _laplacian_matrix(kh: int, kw: int, device) -> torch.Tensor:
    """M with ``flat(lap(x)) = flat(x) @ M`` (rows are the Laplacians of the basis kernels)."""
    key = ("lapM", kh, kw, device)
    m = _CACHE.get(key)
    if m is None:
        m = _CACHE[key] = _laplacian_direct(_basis(kh, kw, device)).reshape(kh * kw, kh * kw)
    return m


def _apply_operator(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` for a tall (N, k) x and a small (k, k) m, computed as ``(m^T x^T)^T`` (a view):
    the same numbers, ~3x faster on CPU than the skinny GEMM."""
    return (m.T @ x.T).T


def edge_suppress_(g: torch.Tensor, threshold: float, penalty: float, floor: float) -> torch.Tensor:
    """Damp the gradient where its Laplacian is strong (in place; spatial tensors only).

    Kernels of up to ``MATRIX_MAX`` taps apply the Laplacian as one matmul with the operator
    built from the basis kernels (same result, far faster on CPU than padding and
    convolving thousands of 3x3 images).
    """
    kh, kw = g.shape[-2], g.shape[-1]
    if kh * kw <= MATRIX_MAX:
        lap = torch.mm(g.reshape(-1, kh * kw).float(), _laplacian_matrix(kh, kw, g.device))  # contiguous mask
    else:
        lap = _laplacian_direct(_kernels(g).float())
    # e = |L| / (4 max|g|) > threshold  <=>  |L| > 4 threshold max|g|
    edge = lap.abs_() > (4.0 * threshold) * g.abs().amax()
    keep = max(1.0 - penalty, floor)
    return g.addcmul_(g, edge.reshape(g.shape), value=keep - 1.0)


def _radial(kh: int, kw: int, device) -> torch.Tensor:
    key = ("rad", kh, kw, device)
    r = _CACHE.get(key)
    if r is None:
        fy = torch.fft.fftfreq(kh, device=device).abs()
        fx = torch.fft.rfftfreq(kw, device=device)
        r2 = fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2
        r = _CACHE[key] = (r2 / r2.max().clamp_min(TINY)).float()
    return r


def _spectra(kh: int, kw: int, device) -> torch.Tensor:
    key = ("spec", kh, kw, device)
    b = _CACHE.get(key)
    if b is None:
        b = _CACHE[key] = torch.fft.rfft2(_basis(kh, kw, device), norm="ortho")
    return b


def frequency_penalty_(g: torch.Tensor, strength: float, floor: float) -> torch.Tensor:
    """Attenuate high spatial frequencies of the gradient (in place; spatial tensors only).

    ``irfft2(rfft2(x) * w)`` is linear in x: for kernels of up to ``MATRIX_MAX`` taps the
    filter is built each call by the FFT of the basis kernels and applied as one matmul.
    """
    kh, kw = g.shape[-2], g.shape[-1]
    w = (1.0 - strength * _radial(kh, kw, g.device)).clamp_(min=floor)
    if kh * kw <= MATRIX_MAX:
        op = torch.fft.irfft2(_spectra(kh, kw, g.device) * w, s=(kh, kw), norm="ortho").reshape(kh * kw, kh * kw)
        out = _apply_operator(g.reshape(-1, kh * kw).float(), op)
    else:
        spec = torch.fft.rfft2(_kernels(g).float(), norm="ortho")
        out = torch.fft.irfft2(spec.mul_(w), s=(kh, kw), norm="ortho")
    return g.copy_(out.reshape(g.shape))


def spatial_awareness_(g: torch.Tensor, strength: float, floor: float) -> torch.Tensor:
    """Scale each kernel by its spatial variance relative to the tensor mean (in place)."""
    k = g.shape[-2] * g.shape[-1]
    x = g.reshape(-1, k)
    avg = torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)
    mean = x @ avg  # row means as a mat-vec: far faster than var(dim=1) over 9-element rows
    var = (x.square() @ avg).sub_(mean.square_()).clamp_(min=0.0)
    rho = var / var.mean().clamp_min(TINY)
    f = torch.sqrt(2.0 / (1.0 + rho)).clamp_(max=1.0)
    f = (1.0 - strength * (1.0 - f)).clamp_(min=floor)
    x.mul_(f.unsqueeze(1))
    return g


def background_(g: torch.Tensor, threshold: float, penalty: float) -> torch.Tensor:
    """Damp kernels whose gradient energy is below ``threshold`` x the tensor's mean (in place)."""
    k = g.shape[-2] * g.shape[-1]
    x = g.reshape(-1, k)
    energy = x.square() @ torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)
    bg = energy < threshold * energy.mean()
    x.mul_(bg.to(g.dtype).mul_(-penalty).add_(1.0).unsqueeze(1))
    return g


def tail_operator(w: torch.Tensor, max_dim: int = 256, rank: int = 16, oversample: int = 8,
                  generator: torch.Generator | None = None) -> dict:
    """Operator for the tail of ``w``'s matrix view (see the module docstring).

    Returns ``{"P": (s, s)}`` (exact, small side s <= max_dim) or ``{"U": (s, k)}``
    (randomized, seeded by ``generator``), plus ``"left"``: whether the small side is rows.
    """
    rows, cols = lowrank_view(w.shape)
    m = w.detach().reshape(rows, cols).float()
    left = rows <= cols
    side = rows if left else cols
    if side <= max_dim:
        gram = m @ m.T if left else m.T @ m
        evals, evecs = torch.linalg.eigh(gram)
        sigma = evals.clamp_min(0.0).sqrt()
        wts = 1.0 - sigma / sigma[-1].clamp_min(TINY)
        return {"P": (evecs * wts) @ evecs.T, "left": left}
    a = m if left else m.T  # (side, other)
    k = min(rank, side)
    omega = torch.randn(a.shape[1], k + oversample, generator=generator, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    b = q.T @ a
    _, vecs = torch.linalg.eigh(b @ b.T)
    return {"U": q @ vecs[:, -k:], "left": left}


def apply_tail(op: dict, x: torch.Tensor) -> torch.Tensor:
    """``tail(x)`` for a tensor shaped like the parameter; returns a new tensor of x's shape."""
    rows = x.shape[0]
    m = x.reshape(rows, -1)
    left = op["left"]
    if "P" in op:
        out = op["P"] @ m if left else m @ op["P"]
    else:
        u = op["U"]
        out = m - u @ (u.T @ m) if left else m - (m @ u) @ u.T
    return out.view(x.shape)
