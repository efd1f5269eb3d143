"""kohya sd-scripts' folder dataset: ``train_data_dir/<repeats>_<name>/image.(png|jpg|webp)``
with captions in ``image.txt`` or ``image.caption`` beside each image.

The batch order is a pure function of (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .buckets import Buckets, Fit, bucket_info, cover
from .captions import CaptionRules, class_tokens
from .errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    folder: str
    subset: int = 0  # index into the dataset's subsets
    is_reg: bool = False  # a regularisation image (--reg_data_dir, is_reg = true)


@dataclass(frozen=True)
class Subset:
    """A folder of images trained with the same options, as an sd-scripts subset."""
    image_dir: str
    num_repeats: int = 1
    name: str = ""  # the name reported in metadata (the kohya folder name)
    class_tokens: str | None = None  # caption of an image without a caption file
    caption_extension: str = ".caption"
    is_reg: bool = False
    captions: CaptionRules | None = None
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False


def kohya_subsets(root: str, caption_extension: str = ".caption", is_reg: bool = False, what: str = "--train_data_dir",
                  **options) -> list[Subset]:
    """The ``<repeats>_<name>`` folders of ``root`` as subsets (kohya ignores other folders)."""
    if not root:
        raise UserError(f"{what} is required")
    if not os.path.isdir(root):
        raise UserError(f"{what} {root!r} does not exist or is not a directory")
    out = []
    for sub in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        head, _, name = sub.partition("_")
        if head.isdigit() and name:
            out.append(Subset(os.path.join(root, sub), int(head), sub, class_tokens(sub), caption_extension, is_reg,
                              **options))
    return out


def scan_subset(subset: Subset, index: int) -> tuple[list[Item], dict]:
    """The subset's images with their captions (not yet repeated), and its folder info."""
    ext = subset.caption_extension if subset.caption_extension.startswith(".") else "." + subset.caption_extension
    extensions = (ext, *(e for e in (".txt", ".caption") if e != ext))
    if not os.path.isdir(subset.image_dir):
        raise UserError(f"image_dir {subset.image_dir!r} does not exist or is not a directory")
    found, missing = [], 0
    for fname in sorted(f for f in os.listdir(subset.image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)):
        caption = _read_caption(os.path.join(subset.image_dir, os.path.splitext(fname)[0]), extensions)
        if caption is None:  # as sd-scripts: the subset's class token stands in
            caption, missing = subset.class_tokens or "", missing + 1
        found.append(Item(os.path.join(subset.image_dir, fname), caption, subset.name or subset.image_dir, index,
                          subset.is_reg))
    return found, {"n_repeats": subset.num_repeats, "img_count": len(found), "missing_captions": missing}


def gather(subsets: list[Subset]) -> tuple[list[Item], dict, dict]:
    """Every training image repeated ``num_repeats`` times, then the regularisation images repeated
    until they are as many as the training images (sd-scripts' rule); and per-folder info of both."""
    items, info, reg_info, reg_found = [], {}, {}, []
    for index, subset in enumerate(subsets):
        found, folder = scan_subset(subset, index)
        key = subset.name or subset.image_dir
        if subset.is_reg:
            reg_info[key] = folder
            reg_found.append((found, subset.num_repeats))
        else:
            info[key] = folder
            items.extend(found * subset.num_repeats)
    return items + _balanced_reg(reg_found, len(items)), info, reg_info


def _balanced_reg(reg_found, n_train: int) -> list[Item]:
    """Regularisation images for one epoch: each folder with its repeats first, then one more copy
    of image after image until there are as many as training images (sd-scripts' loop)."""
    flat = [(item, repeats) for found, repeats in reg_found for item in found]
    if not flat or not n_train:
        return []
    counts = [0] * len(flat)
    n, first = 0, True
    while n < n_train:
        for k, (_, repeats) in enumerate(flat):
            counts[k] += repeats if first else 1
            n += repeats if first else 1
            if n >= n_train:
                break
        first = False
    return [item for (item, _), c in zip(flat, counts) for _ in range(c)]


def scan(train_data_dir: str, caption_extension: str = ".caption") -> tuple[list[Item], dict]:
    """Every image of a kohya folder with its caption, each repeated ``<repeats>`` times; and per-folder info."""
    items, info, _ = gather(kohya_subsets(train_data_dir, caption_extension))
    if not items:
        raise UserError(
            f"--train_data_dir {train_data_dir!r} holds no images in <repeats>_<name> folders "
            f"(e.g. {os.path.join(train_data_dir, '10_mychar')}/001.png)"
        )
    return items, info


def _read_caption(stem: str, extensions) -> str | None:
    for e in extensions:
        if os.path.isfile(stem + e):
            with open(stem + e, encoding="utf-8") as f:
                return f.read().strip()
    return None


@dataclass
class Augment:
    """The random streams and the epoch a batch is augmented with (flips, caption rules)."""
    flip_gen: torch.Generator | None = None
    caption_gen: torch.Generator | None = None
    epoch: int = 1  # 1-based, as sd-scripts counts for --caption_dropout_every_n_epochs


def verify_images(items) -> int:
    """Decode every distinct image once, before any model is loaded, so an unreadable file ends the
    run at the start (one line naming it) rather than mid-training. Returns how many were read."""
    paths = list(dict.fromkeys(it.path for it in items))
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()  # structure and checksums
            with Image.open(path) as im:
                im.load()  # the pixels themselves: a truncated file fails here
        except Exception as e:
            raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return len(paths)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _resample(size: tuple[int, int], new: tuple[int, int]):
    """Area averaging when shrinking (PIL's BOX), Lanczos when enlarging, as sd-scripts chooses."""
    return Image.BOX if new[0] <= size[0] and new[1] <= size[1] else Image.LANCZOS


def load_image(path: str, fit: Fit, crop: bool = True) -> torch.Tensor:
    """RGB image resized to ``fit.resized`` and (``crop``) centre-cropped to ``fit.bucket``, in [-1, 1], CHW."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != fit.resized:
            im = im.resize(fit.resized, _resample(im.size, fit.resized))
        left, top = fit.crop_left_top
        if crop and fit.resized != fit.bucket:
            im = im.crop((left, top, left + fit.bucket[0], top + fit.bucket[1]))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def random_crop(img: torch.Tensor, size: tuple[int, int], gen: torch.Generator | None) -> torch.Tensor:
    """A ``size`` (width, height) window of ``img`` at a random offset (centred without ``gen``)."""
    h, w = img.shape[-2:]
    if gen is None:
        left, top = (w - size[0]) // 2, (h - size[1]) // 2
    else:
        left = int(torch.randint(0, w - size[0] + 1, (), generator=gen))
        top = int(torch.randint(0, h - size[1] + 1, (), generator=gen))
    return img[..., top:top + size[1], left:left + size[0]]


def color_aug(img: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """sd-scripts' --color_aug: with probability 1/3, either a hue shift of up to 8/180 of the hue
    circle or a gamma in [0.95, 1.05] on the 0-255 values (half the time each)."""
    if gen is None or float(torch.rand((), generator=gen)) > 0.33:
        return img
    pixels = ((img.permute(1, 2, 0) + 1.0) * 127.5).clamp(0, 255)
    if float(torch.rand((), generator=gen)) > 0.5:
        shift = (float(torch.rand((), generator=gen)) * 16 - 8) / 180 * 256
        hsv = np.array(Image.fromarray(pixels.round().to(torch.uint8).numpy()).convert("HSV"))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(shift)) % 256).astype(np.uint8)
        pixels = torch.from_numpy(np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.float32).copy())
    else:
        gamma = 0.95 + 0.1 * float(torch.rand((), generator=gen))
        pixels = pixels.pow(gamma).clamp(0, 255)
    return (pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _chunk(order: list, size: int, pad: bool) -> list:
    """``order`` in batches of ``size``; the last one short, or (``pad``) filled by wrapping around."""
    batches = []
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        if pad and len(batch) < size:
            batch = [order[(start + j) % len(order)] for j in range(size)]
        batches.append(batch)
    return batches


class FolderDataset:
    """The images of a kohya-layout folder (or of ``subsets``: a dataset config, regularisation
    folders), each fitted to its training size (one size, or its aspect-ratio bucket with
    ``buckets``), in batches that never mix sizes. Augmentations and caption rules are per subset."""

    def __init__(self, train_data_dir: str | None, resolution, caption_extension: str = ".caption",
                 flip_aug: bool = False, buckets: Buckets | None = None, captions: CaptionRules | None = None,
                 color_aug: bool = False, random_crop: bool = False, subsets: list[Subset] | None = None):
        if subsets is None:
            subsets = kohya_subsets(train_data_dir, caption_extension, captions=captions, flip_aug=flip_aug,
                                    color_aug=color_aug, random_crop=random_crop)
        self.subsets = subsets
        self.items, self.folders, self.reg_folders = gather(subsets)
        if not any(not it.is_reg for it in self.items):
            where = f"--train_data_dir {train_data_dir!r}" if train_data_dir else "the dataset"
            raise UserError(f"{where} holds no training images"
                            + (f" in <repeats>_<name> folders (e.g. {os.path.join(train_data_dir, '10_mychar')}/001.png)"
                               if train_data_dir else ""))
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.buckets = buckets
        self._cache: dict[str, torch.Tensor] = {}
        self.num_images = sum(v["img_count"] for v in self.folders.values())
        self.num_reg_images = sum(v["img_count"] for v in self.reg_folders.values())
        self._subset_index = {it.path: it.subset for it in self.items}
        self.fits = {path: self._fit(path) for path in dict.fromkeys(it.path for it in self.items)}
        self.groups = self._group_by_bucket()

    def _subset_of(self, path: str) -> Subset:
        return self.subsets[self._subset_index[path]]

    def _fit(self, path: str) -> Fit:
        size = image_size(path)
        fit = self.buckets.fit(size) if self.buckets is not None else cover(size, self.resolution)
        if min(fit.bucket) < 1:
            raise UserError(f"image {path} ({size[0]}x{size[1]}) is smaller than one --bucket_reso_steps")
        return fit

    def _group_by_bucket(self) -> list[list[int]]:
        groups: dict = {}
        for i, it in enumerate(self.items):
            groups.setdefault(self.fits[it.path].bucket, []).append(i)
        return [groups[b] for b in sorted(groups)]

    def __len__(self) -> int:
        return len(self.items)

    def bucket_info(self) -> dict | None:
        """``ss_bucket_info`` (None without buckets)."""
        if self.buckets is None:
            return None
        counts = {path: 0 for path in self.fits}
        for it in self.items:
            counts[it.path] += 1
        return bucket_info(list(self.fits.values()), list(counts.values()))

    def first_cropped(self, tolerance: float = 0.01):
        """The first image (path, fit) that loses more than ``tolerance`` of its area to the crop."""
        return next(((p, f) for p, f in self.fits.items() if f.kept_fraction < 1 - tolerance), None)

    def image(self, path: str) -> torch.Tensor:
        t = self._cache.get(path)
        if t is None:
            try:
                t = load_image(path, self.fits[path], crop=not self._subset_of(path).random_crop)
            except Exception as e:
                raise UserError(f"cannot read image {path}: {e}") from None
            self._cache[path] = t
        return t

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(len(g) / batch_size) for g in self.groups)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(len(self.items), generator=gen).tolist()

    def epoch_batches(self, seed: int, epoch: int, batch_size: int, pad: bool = False) -> list[list[int]]:
        """The epoch's batches of item indices, a pure function of (seed, epoch): each bucket's
        items shuffled and cut into batches, then the batches shuffled (one bucket: the shuffled
        items in order). ``pad`` fills a short last batch by wrapping around its bucket."""
        if len(self.groups) == 1:
            return _chunk(self.epoch_order(seed, epoch), batch_size, pad)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        batches = []
        for group in self.groups:
            perm = torch.randperm(len(group), generator=gen).tolist()
            batches += _chunk([group[i] for i in perm], batch_size, pad)
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def batch(self, indices, augment: Augment | None = None):
        """(images, captions, flipped) of the items ``indices``; with ``flip_aug`` each image is
        mirrored with probability 1/2, then randomly cropped (``random_crop``) and colour-shifted
        (``color_aug``), all drawn from ``augment.flip_gen``; the caption rules draw from
        ``augment.caption_gen``. Without ``augment`` nothing is random."""
        imgs, caps, flips = [], [], []
        flip_gen = augment.flip_gen if augment is not None else None
        for i in indices:
            it = self.items[i]
            subset = self.subsets[it.subset]
            img = self.image(it.path)
            flip = bool(subset.flip_aug and flip_gen is not None and torch.rand((), generator=flip_gen) < 0.5)
            img = img.flip(-1) if flip else img
            if subset.random_crop:
                img = random_crop(img, self.fits[it.path].bucket, flip_gen)
            if subset.color_aug:
                img = color_aug(img, flip_gen)
            imgs.append(img)
            caps.append(self.caption(it.caption, subset.captions, augment))
            flips.append(flip)
        return torch.stack(imgs), caps, flips

    @staticmethod
    def caption(caption: str, rules: CaptionRules | None, augment: Augment | None) -> str:
        if rules is None or not rules.active or augment is None:
            return caption
        return rules.apply(caption, augment.epoch, augment.caption_gen)

    def loss_weights(self, indices, prior_loss_weight: float) -> torch.Tensor | None:
        """Per-sample loss weights: ``prior_loss_weight`` for regularisation images (None: all 1)."""
        if not any(self.items[i].is_reg for i in indices):
            return None
        return torch.tensor([prior_loss_weight if self.items[i].is_reg else 1.0 for i in indices])

    def size_conditions(self, indices, flips) -> torch.Tensor:
        """SDXL's size / crop numbers of the items, (len(indices), 6)."""
        rows = [self.fits[self.items[i].path].size_condition(f) for i, f in zip(indices, flips)]
        return torch.tensor(rows, dtype=torch.float32)

    def tag_frequency(self) -> dict:
        freq: dict = {}
        for folder in self.folders:
            counts: dict = {}
            seen = set()
            for it in self.items:
                if it.folder != folder or it.path in seen:
                    continue
                seen.add(it.path)
                for tag in (t.strip() for t in it.caption.split(",")):
                    if tag:
                        counts[tag] = counts.get(tag, 0) + 1
            freq[folder] = counts
        return freq
