"""Aspect-ratio bucketing with sd-scripts' rules (``--enable_bucket`` and its options).

Every image gets a :class:`Fit`: the bucket (the size it is trained at), the size it is resized
to first, and where the bucket is cut out of the resized image (centred). Without buckets every
image fits the one training size the same way: resized so it covers that size, then centre-cropped,
as sd-scripts does when it caches latents.

Rules (sd-scripts ``BucketManager`` / ``make_bucket_resolutions``, re-derived here):

- Upscaling allowed (the default): the candidate buckets are the square nearest the
  ``--resolution`` area, and for each width ``w`` from ``--min_bucket_reso`` to
  ``--max_bucket_reso`` in steps of ``--bucket_reso_steps`` the largest height ``h <= max`` that is
  a multiple of the step with ``w * h <= area``, in both orientations. An image whose exact size is
  a bucket keeps it; any other takes the bucket of nearest aspect ratio and is scaled so it covers
  the bucket (the side that overshoots is cropped, centred).
- ``--bucket_no_upscale``: an image larger in area than ``--resolution`` is scaled down to that
  area keeping its aspect (whichever rounding of its sides to the step keeps the aspect better);
  the bucket is then its size rounded down to the step, so it is only ever cropped by less than
  one step per side and never enlarged. min/max bucket sizes do not apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Fit:
    """How one image becomes a training input of size ``bucket`` (width, height)."""
    original: tuple[int, int]
    resized: tuple[int, int]
    bucket: tuple[int, int]

    @property
    def crop_left_top(self) -> tuple[int, int]:
        """Where the bucket is cut out of the resized image (centred)."""
        return (self.resized[0] - self.bucket[0]) // 2, (self.resized[1] - self.bucket[1]) // 2

    @property
    def kept_fraction(self) -> float:
        """Share of the image's area that survives the crop."""
        return (self.bucket[0] * self.bucket[1]) / (self.resized[0] * self.resized[1])

    @property
    def aspect_error(self) -> float:
        return self.bucket[0] / self.bucket[1] - self.original[0] / self.original[1]

    def size_condition(self, flipped: bool = False) -> tuple[int, int, int, int, int, int]:
        """SDXL's six size numbers for this image, as sd-scripts computes them: original (h, w),
        crop (top, left) and target (h, w). The crop follows Stability AI's preprocessing (the
        image fitted inside the bucket, offsets centred); a flipped image's left is mirrored."""
        (bw, bh), (ow, oh) = self.bucket, self.original
        if bw / bh > ow / oh:
            width, height = bh * ow / oh, bh
        else:
            width, height = bw, bw * oh / ow
        left, top = (bw - width) // 2, (bh - height) // 2
        if flipped:
            left = bw - (left + width)
        return oh, ow, int(top), int(left), bh, bw


def bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """The candidate buckets for an area of ``max_reso``, sorted (sd-scripts' set)."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // step) * step
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def cover(size: tuple[int, int], bucket: tuple[int, int]) -> Fit:
    """Scale ``size`` so it just covers ``bucket`` (the longer relative side is cropped)."""
    w, h = size
    scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
    return Fit(size, (int(w * scale + 0.5), int(h * scale + 0.5)), bucket)


class Buckets:
    """Assigns buckets to image sizes for one ``--resolution`` and the bucket options."""

    def __init__(self, resolution: tuple[int, int], min_reso: int, max_reso: int, step: int, no_upscale: bool):
        self.resolution = resolution
        self.min_reso, self.max_reso = (None, None) if no_upscale else (min_reso, max_reso)
        self.step = step
        self.no_upscale = no_upscale
        self.area = resolution[0] * resolution[1]
        self.candidates = [] if no_upscale else bucket_resolutions(resolution, min_reso, max_reso, step)
        self._candidate_set = set(self.candidates)

    def fit(self, size: tuple[int, int]) -> Fit:
        return self._shrink_only(size) if self.no_upscale else self._nearest_aspect(size)

    def _nearest_aspect(self, size: tuple[int, int]) -> Fit:
        if size in self._candidate_set:
            return Fit(size, size, size)
        aspect = size[0] / size[1]
        bucket = min(self.candidates, key=lambda r: abs(r[0] / r[1] - aspect))  # first of equals, as argmin
        return cover(size, bucket)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def _shrink_only(self, size: tuple[int, int]) -> Fit:
        w, h = size
        resized = size
        if w * h > self.area:
            aspect = w / h
            width = math.sqrt(self.area * aspect)
            by_width = self._round(width)
            by_height = self._round(self.area / width)
            error_w = abs(by_width / self._round(by_width / aspect) - aspect) if self._round(by_width / aspect) else math.inf
            error_h = abs(self._round(by_height * aspect) / by_height - aspect) if by_height else math.inf
            if error_w < error_h:
                resized = (by_width, int(by_width / aspect + 0.5))
            else:
                resized = (int(by_height * aspect + 0.5), by_height)
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return Fit(size, resized, bucket)


def bucket_info(fits: list[Fit], counts: list[int]) -> dict:
    """``ss_bucket_info`` as sd-scripts writes it: per bucket (sorted) its resolution and image
    count with repeats, and the mean absolute aspect-ratio error over distinct images."""
    per_bucket: dict = {}
    for fit, n in zip(fits, counts):
        per_bucket[fit.bucket] = per_bucket.get(fit.bucket, 0) + n
    buckets = {i: {"resolution": list(reso), "count": per_bucket[reso]} for i, reso in enumerate(sorted(per_bucket))}
    mean_error = sum(abs(f.aspect_error) for f in fits) / len(fits) if fits else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}
