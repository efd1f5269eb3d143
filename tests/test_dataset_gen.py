import os
import re

import numpy as np
import pytest
from PIL import Image

from library import dataset_gen
from library.dataset_gen import dataset_dir, list_items, make_dataset, render_item

CAPTION_RE = re.compile(
    r"^an? (?P<fg>\w+) (?P<shape>\w+) on an? (?P<bg>\w+)(?: (?P<style>striped|checkered|dotted))? background$"
)


def _files(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_kohya_layout_and_captions(tmp_path):
    root = make_dataset(str(tmp_path / "train"), n_images=16, resolution=64, seed=0)
    assert root == str(tmp_path / "train")
    folder = os.path.join(root, "2_shapes")
    assert dataset_dir(root) == folder and os.path.isdir(folder)
    assert [d for d in os.listdir(root)] == ["2_shapes"]
    for i in range(16):
        img = Image.open(os.path.join(folder, f"{i:04d}.png"))
        assert img.size == (64, 64) and img.mode == "RGB"
        with open(os.path.join(folder, f"{i:04d}.txt")) as f:
            caption = f.read().strip()
        m = CAPTION_RE.match(caption)
        assert m, caption
        assert m["fg"] in dataset_gen.COLORS and m["bg"] in dataset_gen.COLORS and m["fg"] != m["bg"]
        assert m["shape"] in dataset_gen.SHAPES and m["style"] is None
    shapes = {CAPTION_RE.match(c)["shape"] for _, c in list_items(root)}
    assert shapes == set(dataset_gen.SHAPES)  # 16 items cycle through every shape


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = _files(dataset_dir(make_dataset(str(tmp_path / "a"), n_images=8, seed=3)))
    b = _files(dataset_dir(make_dataset(str(tmp_path / "b"), n_images=8, seed=3)))
    c = _files(dataset_dir(make_dataset(str(tmp_path / "c"), n_images=8, seed=4)))
    assert a == b
    pngs = [n for n in a if n.endswith(".png")]
    assert len(pngs) == 8
    assert sum(a[n] != c[n] for n in pngs) >= 6


def test_images_show_the_captioned_colours(tmp_path):
    # the background colour dominates the border, the shape colour is present somewhere
    for i in range(6):
        img, caption = render_item(i, 64, seed=1)
        m = CAPTION_RE.match(caption)
        arr = np.asarray(img).astype(int)
        corner = arr[0, 0]
        assert np.abs(corner - np.array(dataset_gen.COLORS[m["bg"]])).max() < 40, caption
        fg = np.array(dataset_gen.COLORS[m["fg"]])
        assert (np.abs(arr - fg).max(axis=-1) < 30).sum() > 20, caption


def test_idempotent_and_regenerates_on_change(tmp_path):
    root = str(tmp_path / "d")
    make_dataset(root, n_images=6, seed=0)
    folder = dataset_dir(root)
    png = os.path.join(folder, "0000.png")
    before = os.stat(png).st_mtime_ns
    make_dataset(root, n_images=6, seed=0)
    assert os.stat(png).st_mtime_ns == before

    make_dataset(root, n_images=3, seed=0)  # smaller: surplus files go
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    assert names == ["0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt"]
    os.remove(os.path.join(folder, "0001.txt"))  # damaged: rebuilt
    make_dataset(root, n_images=3, seed=0)
    assert os.path.isfile(os.path.join(folder, "0001.txt"))


def test_repeats_name_resolution(tmp_path):
    root = make_dataset(str(tmp_path / "r"), n_images=2, resolution=128, name="toy", repeats=5)
    folder = os.path.join(root, "5_toy")
    assert Image.open(os.path.join(folder, "0001.png")).size == (128, 128)
    items = list_items(root)
    assert [os.path.basename(p) for p, _ in items] == ["0000.png", "0001.png"]
    with pytest.raises(ValueError):
        make_dataset(str(tmp_path / "bad"), resolution=30)


def _high_freq(img):
    a = np.asarray(img.convert("L")).astype(float)
    return np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()


@pytest.mark.parametrize("style", ["striped", "checkered", "dotted"])
def test_styles_are_distinct(tmp_path, style):
    root = make_dataset(str(tmp_path / style), n_images=6, seed=0, name=style, style=style)
    items = list_items(root)
    assert len(items) == 6
    for _, caption in items:
        assert CAPTION_RE.match(caption)["style"] == style
    plain = [render_item(i, 64, seed=0)[0] for i in range(6)]
    styled = [Image.open(p) for p, _ in items]
    assert np.mean([_high_freq(im) for im in styled]) > 3 * np.mean([_high_freq(im) for im in plain])
    # the style changes the image, not just the caption
    assert all(np.asarray(a).tobytes() != np.asarray(b).tobytes() for a, b in zip(plain, styled))


def test_unknown_style_rejected(tmp_path):
    with pytest.raises(ValueError):
        make_dataset(str(tmp_path / "x"), style="wavy")
    assert render_item(0, style=None)[1] == render_item(0, style="plain")[1]


def test_files_appear_whole_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    """Each file is written aside and renamed (processes building the same dataset at once never
    read a torn PNG); a write that fails leaves the file as it was and no temporary behind."""
    root = str(tmp_path / "d")
    make_dataset(root, n_images=2, seed=0)
    folder = dataset_dir(root)
    before = _files(folder)
    assert not [n for n in before if ".tmp-" in n]

    def torn(f):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        dataset_gen._write_whole(os.path.join(folder, "0000.png"), torn)
    assert _files(folder) == before

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(dataset_gen.os, "replace", lambda a, b: (renames.append(b), real_replace(a, b))[1])
    make_dataset(root, n_images=2, seed=1)  # other arguments: rewritten, every file through a rename
    assert sorted(os.path.basename(p) for p in renames) == sorted(n for n in _files(folder))
