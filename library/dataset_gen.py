"""Generated image/caption datasets in kohya sd-scripts' folder layout.

`make_dataset(root, ...)` draws simple coloured shapes on a background and writes::

    root/<repeats>_<name>/0000.png
    root/<repeats>_<name>/0000.txt     "a red circle on a blue background"
    ...

`root` is what kohya's ``--train_data_dir`` expects (it reads every ``<repeats>_<name>`` folder
in it); captions use the ``.txt`` extension (pass ``--caption_extension .txt``).

Everything is a pure function of the arguments: the same seed gives byte-identical PNGs.
`style` picks a background pattern that is visually distinct from the default plain one, for
held-out fine-tuning benchmarks:

* ``None`` / ``"plain"``: flat background, caption "a red circle on a blue background"
* ``"striped"``: diagonal stripes, "... on a blue striped background"
* ``"checkered"``: checkerboard, "... on a blue checkered background"
* ``"dotted"``: dot grid, "... on a blue dotted background"

A folder already holding a dataset written with the same arguments (``.dataset_gen.json``
marker plus every image and caption) is left as is.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

SPEC_VERSION = 1
MARKER = ".dataset_gen.json"

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
    "pink": (245, 150, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (40, 210, 220),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
STYLES = ("plain", "striped", "checkered", "dotted")
_STYLE_IDS = {s: i for i, s in enumerate(STYLES)}
_SUPERSAMPLE = 4


def dataset_dir(root: str, name: str = "shapes", repeats: int = 2) -> str:
    """The image folder make_dataset writes: root/<repeats>_<name>."""
    return os.path.join(os.fspath(root), f"{int(repeats)}_{name}")


def _normalise_style(style):
    style = "plain" if style in (None, "", "none") else str(style).lower()
    if style not in _STYLE_IDS:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    return style


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _mix(c1, c2, t):
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(c1, c2))


def _paint_background(draw: ImageDraw.ImageDraw, size: int, color, style: str, rng) -> None:
    draw.rectangle([0, 0, size, size], fill=color)
    if style == "plain":
        return
    # The pattern colour is a strong contrast of the background, so the style is obvious.
    lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    other = _mix(color, (255, 255, 255) if lum < 140 else (0, 0, 0), 0.55)
    period = size // 8  # 8 stripes / cells / dots across the image
    if style == "striped":
        half = period // 2
        offset = int(rng.integers(0, period))
        for k in range(-size, 2 * size, period):
            x0 = k + offset
            draw.polygon([(x0, 0), (x0 + half, 0), (x0 + half - size, size), (x0 - size, size)], fill=other)
    elif style == "checkered":
        for yi in range(8):
            for xi in range(8):
                if (xi + yi) % 2:
                    draw.rectangle(
                        [xi * period, yi * period, (xi + 1) * period - 1, (yi + 1) * period - 1], fill=other
                    )
    elif style == "dotted":
        r = period * 0.28
        for yi in range(8):
            for xi in range(8):
                cx, cy = (xi + 0.5) * period, (yi + 0.5) * period
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=other)


def _paint_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color, bg) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=color)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        inner = r * 0.5
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=bg)
    else:
        raise ValueError(shape)


def render_item(index: int, resolution: int = 64, seed: int = 0, style=None) -> tuple[Image.Image, str]:
    """(RGB image, caption) of dataset item `index`; a pure function of its arguments."""
    style = _normalise_style(style)
    rng = np.random.default_rng([int(seed), _STYLE_IDS[style], int(index)])
    names = list(COLORS)
    shape = SHAPES[index % len(SHAPES)]
    fg_name = names[int(rng.integers(len(names)))]
    bg_name = names[int(rng.integers(len(names) - 1))]
    if bg_name == fg_name:  # draw from the other len-1 colours
        bg_name = names[-1]
    fg, bg = COLORS[fg_name], COLORS[bg_name]

    big = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    _paint_background(draw, big, bg, style, rng)
    r = big * float(rng.uniform(0.18, 0.3))
    cx = float(rng.uniform(r + big * 0.04, big - r - big * 0.04))
    cy = float(rng.uniform(r + big * 0.04, big - r - big * 0.04))
    # For patterned backgrounds the ring's hole shows the plain colour; fine for a toy set.
    _paint_shape(draw, shape, cx, cy, r, fg, bg)
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)

    where = f"{bg_name} background" if style == "plain" else f"{bg_name} {style} background"
    return img, f"{_article(fg_name)} {fg_name} {shape} on {_article(bg_name)} {where}"


def _marker_info(n_images, resolution, seed, style):
    return {
        "spec_version": SPEC_VERSION,
        "n_images": int(n_images),
        "resolution": int(resolution),
        "seed": int(seed),
        "style": style,
    }


def _is_complete(folder: str, info: dict) -> bool:
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            if json.load(f) != info:
                return False
    except (OSError, ValueError):
        return False
    return all(
        os.path.isfile(os.path.join(folder, f"{i:04d}{ext}"))
        for i in range(info["n_images"])
        for ext in (".png", ".txt")
    )


def make_dataset(
    root: str,
    n_images: int = 16,
    resolution: int = 64,
    seed: int = 0,
    name: str = "shapes",
    repeats: int = 2,
    style=None,
) -> str:
    """Write (or reuse) root/<repeats>_<name>/NNNN.png + NNNN.txt; returns `root` (absolute).

    `root` is the kohya train_data_dir; use dataset_dir(root, name, repeats) for the image
    folder itself. Files of an earlier, different call in the same folder are overwritten and
    surplus NNNN.png/.txt from a larger earlier call are removed. Each file appears whole (written
    aside, then renamed), so processes building the same dataset at once do not read torn files.
    """
    if resolution < 16 or resolution % 8:
        raise ValueError("resolution must be a multiple of 8, at least 16")
    if n_images < 1:
        raise ValueError("n_images must be >= 1")
    style = _normalise_style(style)
    root = os.path.abspath(os.fspath(root))
    folder = dataset_dir(root, name, repeats)
    info = _marker_info(n_images, resolution, seed, style)
    if _is_complete(folder, info):
        return root

    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    for i in range(n_images):
        img, caption = render_item(i, resolution, seed, style)
        stem = os.path.join(folder, f"{i:04d}")
        _write_whole(stem + ".png", lambda f: img.save(f, format="PNG", optimize=False))
        _write_whole(stem + ".txt", lambda f: f.write((caption + "\n").encode("utf-8")))
    # drop numbered leftovers of an earlier, larger dataset
    for fname in os.listdir(folder):
        stem, ext = os.path.splitext(fname)
        if ext in (".png", ".txt") and stem.isdigit() and int(stem) >= n_images:
            os.remove(os.path.join(folder, fname))
    _write_whole(marker, lambda f: f.write(json.dumps(info, indent=2, sort_keys=True).encode("utf-8")))
    return root


def _write_whole(path: str, write) -> None:
    """``write(binary file)`` into a private temporary sibling, then rename it onto ``path``: a
    reader never sees a half-written file, also while another process writes the same dataset
    (the quality benchmark's worker processes may build it at the same time)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_items(root: str) -> list[tuple[str, str]]:
    """[(image_path, caption)] of every image in root's <repeats>_<name> folders, sorted.

    Repeats are not expanded; a small helper for tests and non-kohya loops.
    """
    root = os.fspath(root)
    items = []
    for sub in sorted(os.listdir(root)):
        folder = os.path.join(root, sub)
        head = sub.split("_", 1)[0]
        if not (os.path.isdir(folder) and "_" in sub and head.isdigit()):
            continue
        for fname in sorted(os.listdir(folder)):
            if not fname.endswith(".png"):
                continue
            path = os.path.join(folder, fname)
            cap_path = os.path.splitext(path)[0] + ".txt"
            caption = ""
            if os.path.isfile(cap_path):
                with open(cap_path, encoding="utf-8") as f:
                    caption = f.read().strip()
            items.append((path, caption))
    return items
