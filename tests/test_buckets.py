"""Aspect-ratio buckets: the assignment against upstream sd-scripts' own BucketManager, the pixels
kept, and training with --enable_bucket / a non-square --resolution on the embedded tiny model."""
import ast
import math
import random
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import train_network
from helpers import upstream_archive
from conftest_tiny import tiny_sd_path  # noqa: F401  (fixture used by name)
from library.buckets import Buckets, bucket_resolutions, cover
from library.dataset import FolderDataset



def _definition(source: str, name: str) -> str:
    tree = ast.parse(source)
    node = next(n for n in tree.body if getattr(n, "name", None) == name)
    return ast.get_source_segment(source, node)


@pytest.fixture(scope="module")
def upstream():
    """sd-scripts' make_bucket_resolutions and BucketManager, executed from the real upstream files."""
    with tarfile.open(upstream_archive()) as tar:
        model_util = tar.extractfile("sd-scripts/library/model_util.py").read().decode()
        train_util = tar.extractfile("sd-scripts/library/train_util.py").read().decode()
    ns = {"math": math, "np": np, "random": random, "Tuple": tuple, "logger": None}
    exec(_definition(model_util, "make_bucket_resolutions"), ns)
    ns["model_util"] = types.SimpleNamespace(make_bucket_resolutions=ns["make_bucket_resolutions"])
    exec(_definition(train_util, "BucketManager"), ns)
    return ns


SETTINGS = [((512, 512), 256, 1024, 64), ((1024, 1024), 256, 2048, 64), ((512, 768), 320, 1024, 64),
            ((768, 768), 384, 1536, 32), ((64, 64), 32, 128, 16)]


@pytest.mark.parametrize("reso,low,high,step", SETTINGS)
def test_candidate_buckets_are_upstreams(upstream, reso, low, high, step):
    assert bucket_resolutions(reso, low, high, step) == upstream["make_bucket_resolutions"](reso, low, high, step)


@pytest.mark.parametrize("no_upscale", [False, True])
@pytest.mark.parametrize("reso,low,high,step", SETTINGS)
def test_every_image_gets_upstreams_bucket_and_size(upstream, reso, low, high, step, no_upscale):
    rng = random.Random(hash((reso, low, step, no_upscale)) & 0xFFFF)
    sizes = [(rng.randint(step, 3 * high), rng.randint(step, 3 * high)) for _ in range(300)]
    sizes += [reso, (reso[0] * 2, reso[1] * 2), (reso[0] // 2, reso[1]), (reso[1], reso[0])]
    ours = Buckets(reso, low, high, step, no_upscale)
    theirs = upstream["BucketManager"](no_upscale, reso, low, high, step)
    if not no_upscale:
        theirs.make_buckets()
    for size in sizes:
        fit = ours.fit(size)
        try:
            bucket, resized, _ = theirs.select_bucket(*size)
        except ZeroDivisionError:  # upstream fails on a sliver thinner than one step: ours gives an empty
            assert min(fit.bucket) == 0, (size, fit)  # bucket, which the dataset refuses in one line
            continue
        assert (fit.bucket, fit.resized) == (tuple(bucket), tuple(resized)), size


@pytest.mark.parametrize("no_upscale", [False, True])
def test_no_image_is_cropped_more_than_its_bucket_requires(no_upscale):
    buckets = Buckets((512, 512), 256, 1024, 64, no_upscale)
    rng = random.Random(3)
    for _ in range(500):
        size = (rng.randint(64, 3000), rng.randint(64, 3000))
        fit = buckets.fit(size)
        w, h = fit.resized
        assert w >= fit.bucket[0] and h >= fit.bucket[1], (size, fit)  # covers the bucket: no padding
        if no_upscale:  # cut only to the step, never enlarged
            assert w - fit.bucket[0] < 64 and h - fit.bucket[1] < 64 and w * h <= max(size[0] * size[1], 1)
        else:  # the smallest scale that covers: one side fits exactly (to rounding)
            assert min(w - fit.bucket[0], h - fit.bucket[1]) <= 1, (size, fit)
        assert abs(w / h - size[0] / size[1]) < 0.02 * size[0] / size[1] + 2 / min(w, h)  # aspect kept


def _marked_image(path: Path, size):
    """Grey with a red band at the top ("head") and a blue band at the bottom ("feet")."""
    im = Image.new("RGB", size, (128, 128, 128))
    im.paste((255, 0, 0), (0, 0, size[0], 8))
    im.paste((0, 0, 255), (0, size[1] - 8, size[0], size[1]))
    im.save(path)


def _mixed_data(root: Path) -> Path:
    d = root / "2_mix"
    d.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (64, 192), (64, 192), (128, 64), (96, 64), (64, 64)]):
        _marked_image(d / f"{i}.png", size)
        (d / f"{i}.txt").write_text("a red circle")
    return root


def test_a_tall_image_keeps_head_and_feet_in_its_bucket_and_loses_them_without(tmp_path):
    data = _mixed_data(tmp_path / "d")
    tall = str(data / "2_mix" / "1.png")
    with_buckets = FolderDataset(str(data), (64, 64), ".txt", buckets=Buckets((64, 64), 32, 128, 16, False))
    img = with_buckets.image(tall)  # CHW in [-1, 1]
    assert tuple(img.shape[1:]) == (96, 32)  # the (32, 96) bucket: exactly its 1:3 shape, nothing cut
    assert img[0, 0].mean() > 0.9 and img[2, 0].mean() < -0.9  # top row red: the head is there
    assert img[2, -1].mean() > 0.9 and img[0, -1].mean() < -0.9  # bottom row blue: so are the feet
    square = FolderDataset(str(data), (64, 64), ".txt")
    img = square.image(tall)
    assert tuple(img.shape[1:]) == (64, 64)
    assert abs(float(img[0, 0].mean())) < 0.1 and abs(float(img[2, -1].mean())) < 0.1  # both cut away
    assert square.first_cropped()[0] == tall


def test_epoch_batches_never_mix_buckets_and_cover_every_item_once(tmp_path):
    data = _mixed_data(tmp_path / "d")
    ds = FolderDataset(str(data), (64, 64), ".txt", buckets=Buckets((64, 64), 32, 128, 16, False))
    assert len(ds.groups) == 3
    for epoch in range(3):
        batches = ds.epoch_batches(5, epoch, 2)
        assert len(batches) == ds.batches_per_epoch(2)
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
        for b in batches:
            assert len({ds.fits[ds.items[i].path].bucket for i in b}) == 1
        assert batches == ds.epoch_batches(5, epoch, 2)  # a pure function of (seed, epoch): resume sees the same
    padded = ds.epoch_batches(5, 0, 4, pad=True)
    assert all(len(b) == 4 for b in padded)
    info = ds.bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == len(ds) == 12
    assert info["mean_img_ar_error"] > 0


def test_cover_scales_to_the_smaller_side_that_fits():
    assert cover((100, 300), (64, 64)).resized == (64, 192)
    assert cover((64, 64), (64, 64)).resized == (64, 64)


# ------------------------------------------------------------ trainer end to end
def _run(tmp_path, *extra, expect=0, name="b"):
    argv = ["--max_train_steps", "4", "--train_batch_size", "2", "--seed", "3", "--no_progress",
            "--output_dir", str(tmp_path / "out"), "--output_name", name, "--caption_extension", ".txt",
            "--network_dim", "4", "--optimizer_type", "AdaptiveHinaAdamW", "--learning_rate", "1e-3", *extra]
    assert train_network.main(argv) == expect
    return tmp_path / "out" / f"{name}.safetensors"


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_mixed_aspect_ratios_train_with_buckets(tiny_sd_path, tmp_path, capsys):
    data = _mixed_data(tmp_path / "d")
    out = _run(tmp_path, "--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", str(data),
               "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16")
    md = _metadata(out)
    assert md["ss_enable_bucket"] == "True" and md["ss_min_bucket_reso"] == "32" and md["ss_max_bucket_reso"] == "128"
    buckets = {tuple(b["resolution"]): b["count"] for b in __import__("json").loads(md["ss_bucket_info"])["buckets"].values()}
    assert buckets == {(32, 96): 4, (64, 64): 4, (80, 48): 4}


def test_non_square_resolution_and_no_upscale_buckets_train(tiny_sd_path, tmp_path):
    data = _mixed_data(tmp_path / "d")
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", str(data)]
    md = _metadata(_run(tmp_path, *common, "--resolution", "64,96", name="r"))
    assert md["ss_resolution"] == "(64, 96)" and md["modelspec.resolution"] == "64x96"
    assert md["ss_enable_bucket"] == "False" and md["ss_bucket_info"] == "null"
    md = _metadata(_run(tmp_path, *common, "--enable_bucket", "--bucket_no_upscale", "--bucket_reso_steps", "16",
                        name="n"))
    assert md["ss_bucket_no_upscale"] == "True"
    sizes = {tuple(b["resolution"]) for b in __import__("json").loads(md["ss_bucket_info"])["buckets"].values()}
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in sizes) and len(sizes) > 1


@pytest.mark.parametrize("extra,expect", [
    (["--enable_bucket", "--bucket_reso_steps", "8"], "--bucket_reso_steps must be a multiple of 16"),
    (["--enable_bucket", "--bucket_reso_steps", "16"], "must lie within --min_bucket_reso 256"),
    (["--enable_bucket", "--bucket_reso_steps", "16", "--min_bucket_reso", "8"], "--min_bucket_reso must be at least"),
    (["--resolution", "64,96,128"], "must be 'N' or 'W,H'"),
])
def test_bucket_mistakes_end_in_one_line_before_any_model_loads(tmp_path, capsys, extra, expect):
    _run(tmp_path, *extra, expect=2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "out" / "b.safetensors").exists()


def test_resume_with_buckets_is_bit_exact(tiny_sd_path, tmp_path):
    """Resumed mid-epoch (step 3 of 7; 6 single-bucket batches per epoch, so it crosses into the second),
    with --flip_aug and --cache_latents."""
    data = _mixed_data(tmp_path / "d")
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--train_data_dir", str(data), "--enable_bucket",
              "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16", "--flip_aug",
              "--cache_latents", "--max_train_steps", "7"]
    straight = _run(tmp_path / "a", *common, name="a")
    _run(tmp_path / "b", *common, "--save_every_n_steps", "3", "--save_state", name="b")
    resumed = _run(tmp_path / "c", *common, "--resume", str(tmp_path / "b" / "out" / "b-step00000003-state"), name="c")
    with safe_open(str(straight), "pt") as a, safe_open(str(resumed), "pt") as c:
        assert a.keys() == c.keys()
        for k in a.keys():
            assert (a.get_tensor(k) == c.get_tensor(k)).all(), k


def test_sdxl_size_numbers_are_upstreams(upstream):
    """original (h, w), crop (top, left) and target (h, w), as sd-scripts builds them from
    BucketManager.get_crop_ltrb (a flipped image's left mirrored)."""
    buckets = Buckets((1024, 1024), 512, 2048, 64, False)
    rng = random.Random(7)
    for _ in range(200):
        size = (rng.randint(300, 4000), rng.randint(300, 4000))
        fit = buckets.fit(size)
        left, top, right, _ = upstream["BucketManager"].get_crop_ltrb(fit.bucket, size)
        bw, bh = fit.bucket
        assert fit.size_condition() == (size[1], size[0], int(top), int(left), bh, bw)
        assert fit.size_condition(flipped=True) == (size[1], size[0], int(top), int(bw - right), bh, bw)


def test_random_crop_cuts_a_bucket_sized_window_anywhere_and_color_aug_changes_colours(tmp_path):
    import torch

    from library.dataset import Augment

    data = _mixed_data(tmp_path / "d")
    wide = str(data / "2_mix" / "3.png")  # 128x64: resized to 96x48, cut to its 80x48 bucket
    ramp = np.repeat(np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    Image.fromarray(ramp).save(wide)  # a left-to-right ramp: every window position has its own sum
    kw = dict(buckets=Buckets((64, 64), 32, 128, 16, False))
    centred = FolderDataset(str(data), (64, 64), ".txt", **kw)
    cropping = FolderDataset(str(data), (64, 64), ".txt", random_crop=True, **kw)
    i = next(n for n, it in enumerate(cropping.items) if it.path == wide)
    assert tuple(cropping.image(wide).shape[1:]) == (48, 96)  # kept whole until the step
    gen = torch.Generator().manual_seed(0)
    windows = {cropping.batch([i], Augment(flip_gen=gen))[0][0].sum().item() for _ in range(12)}
    assert len(windows) > 1  # different offsets
    assert all(tuple(cropping.batch([i], Augment(flip_gen=gen))[0].shape[2:]) == (48, 80) for _ in range(3))
    assert torch.equal(cropping.batch([i])[0], centred.batch([i])[0])  # no generator: the centre, as before
    colour = FolderDataset(str(data), (64, 64), ".txt", color_aug=True, **kw)
    gen = torch.Generator().manual_seed(1)
    outs = [colour.batch([i], Augment(flip_gen=gen))[0] for _ in range(30)]
    changed = [o for o in outs if not torch.equal(o, centred.batch([i])[0])]
    assert 0 < len(changed) < 30  # about a third of the draws
    assert all(float((o - centred.batch([i])[0]).abs().max()) < 0.35 for o in outs)  # small shifts
