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

from .errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    folder: str


def scan(train_data_dir: str, caption_extension: str = ".caption") -> tuple[list[Item], dict]:
    """Every image with its caption, each repeated ``<repeats>`` times; and per-folder info."""
    if not train_data_dir:
        raise UserError("--train_data_dir is required")
    if not os.path.isdir(train_data_dir):
        raise UserError(f"--train_data_dir {train_data_dir!r} does not exist or is not a directory")
    subdirs = sorted(d for d in os.listdir(train_data_dir) if os.path.isdir(os.path.join(train_data_dir, d)))
    items: list[Item] = []
    info = {}
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    others = [e for e in (".txt", ".caption") if e != ext]
    for sub in subdirs:
        head, _, name = sub.partition("_")
        if not head.isdigit() or not name:
            continue  # kohya ignores folders not named <repeats>_<name>
        repeats = int(head)
        folder = os.path.join(train_data_dir, sub)
        images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        found = []
        for fname in images:
            stem = os.path.join(folder, os.path.splitext(fname)[0])
            caption = ""
            for e in (ext, *others):
                if os.path.isfile(stem + e):
                    with open(stem + e, encoding="utf-8") as f:
                        caption = f.read().strip()
                    break
            found.append(Item(os.path.join(folder, fname), caption, sub))
        info[sub] = {"n_repeats": repeats, "img_count": len(found)}
        items.extend(found * repeats)
    if not items:
        raise UserError(
            f"--train_data_dir {train_data_dir!r} holds no images in <repeats>_<name> folders "
            f"(e.g. {os.path.join(train_data_dir, '10_mychar')}/001.png)"
        )
    return items, info


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


def load_image(path: str, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side) and centre-cropped to a square, in [-1, 1], CHW."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class FolderDataset:
    def __init__(self, train_data_dir: str, resolution: int, caption_extension: str = ".caption",
                 flip_aug: bool = False):
        self.items, self.folders = scan(train_data_dir, caption_extension)
        self.resolution = resolution
        self.flip_aug = flip_aug
        self._cache: dict[str, torch.Tensor] = {}
        self.num_images = sum(v["img_count"] for v in self.folders.values())

    def __len__(self) -> int:
        return len(self.items)

    def image(self, path: str) -> torch.Tensor:
        t = self._cache.get(path)
        if t is None:
            try:
                t = load_image(path, self.resolution)
            except Exception as e:
                raise UserError(f"cannot read image {path}: {e}") from None
            self._cache[path] = t
        return t

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.items) / batch_size)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(len(self.items), generator=gen).tolist()

    def batch(self, indices, flip_gen: torch.Generator | None = None):
        imgs, caps = [], []
        for i in indices:
            it = self.items[i]
            img = self.image(it.path)
            if self.flip_aug and flip_gen is not None and torch.rand((), generator=flip_gen) < 0.5:
                img = img.flip(-1)
            imgs.append(img)
            caps.append(it.caption)
        return torch.stack(imgs), caps

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
