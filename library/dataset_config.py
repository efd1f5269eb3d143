"""``--dataset_config``: sd-scripts' dataset TOML (``[general]``, ``[[datasets]]``,
``[[datasets.subsets]]``) read into subsets and the dataset-level settings.

Each key is looked up from the most specific place to the least: the subset, its dataset,
``[general]``, then the command line / ``--config_file`` (sd-scripts' order). One ``[[datasets]]``
with any number of subsets is supported; every mistake (an unknown key, a missing ``image_dir``,
a wrong type) is reported in one message before any model loads.
"""
from __future__ import annotations

import os

from .captions import CaptionRules
from .config_util import describe_unknown, load_toml
from .dataset import Subset
from .errors import UserError

SUBSET_KEYS = {
    "image_dir": str, "num_repeats": int, "class_tokens": str, "caption_extension": str, "is_reg": bool,
    "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str, "caption_prefix": str,
    "caption_suffix": str, "caption_dropout_rate": float, "caption_dropout_every_n_epochs": int,
    "caption_tag_dropout_rate": float, "flip_aug": bool, "color_aug": bool, "random_crop": bool,
}
# dataset key -> (the command-line option it sets, its type; None: checked by --resolution's parser)
DATASET_KEYS = {
    "resolution": ("resolution", None), "batch_size": ("train_batch_size", int), "enable_bucket": ("enable_bucket", bool),
    "min_bucket_reso": ("min_bucket_reso", int), "max_bucket_reso": ("max_bucket_reso", int),
    "bucket_reso_steps": ("bucket_reso_steps", int), "bucket_no_upscale": ("bucket_no_upscale", bool),
}


def load_dataset_config(path: str, args) -> tuple[list[Subset], dict]:
    """(subsets, {option: value} of the dataset-level settings to apply to ``args``)."""
    config = load_toml(path)
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"--dataset_config {path}: no [[datasets]] table")
    if len(datasets) > 1:
        raise UserError(f"--dataset_config {path}: {len(datasets)} [[datasets]]; one is supported here (put the "
                        "subsets under one [[datasets]]: each subset keeps its own options)")
    dataset = datasets[0]
    _check_keys(path, {k for k in config if k not in ("general", "datasets")}, set(), "top level")
    _check_keys(path, set(general) | {k for k in dataset if k != "subsets"}, set(SUBSET_KEYS) | set(DATASET_KEYS),
                "[general] / [[datasets]]")
    for sub in dataset.get("subsets", []):
        _check_keys(path, set(sub), set(SUBSET_KEYS), "[[datasets.subsets]]")
    if not dataset.get("subsets"):
        raise UserError(f"--dataset_config {path}: [[datasets]] has no [[datasets.subsets]]")
    settings = {option: _typed(path, key, dataset.get(key, general.get(key)), kind)
                for key, (option, kind) in DATASET_KEYS.items() if key in dataset or key in general}
    subsets = [_subset(path, i, sub, dataset, general, args) for i, sub in enumerate(dataset["subsets"])]
    return subsets, settings


def _check_keys(path: str, keys: set, known: set, where: str) -> None:
    problem = describe_unknown(sorted(keys - known), sorted(known))
    if problem:
        raise UserError(f"--dataset_config {path} ({where}): {problem}")


def _typed(path: str, key: str, value, kind):
    if key == "resolution":
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    if kind is None or value is None:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"--dataset_config {path}: {key} = {value!r} should be {kind.__name__}")
    return value


def _subset(path: str, index: int, sub: dict, dataset: dict, general: dict, args) -> Subset:
    def get(key):
        for place in (sub, dataset, general):
            if key in place:
                return _typed(path, key, place[key], SUBSET_KEYS[key])
        return getattr(args, key, None)

    image_dir = get("image_dir")
    if not image_dir:
        raise UserError(f"--dataset_config {path}: subset {index + 1} has no image_dir")
    if not os.path.isdir(image_dir):
        raise UserError(f"--dataset_config {path}: subset {index + 1}: image_dir {image_dir!r} does not exist")
    rules = CaptionRules.from_args(_Namespace(get))
    return Subset(image_dir, int(get("num_repeats") or 1), os.path.basename(os.path.normpath(image_dir)),
                  get("class_tokens"), get("caption_extension") or ".caption", bool(get("is_reg")), rules,
                  bool(get("flip_aug")), bool(get("color_aug")), bool(get("random_crop")))


class _Namespace:
    """Attribute access over a key lookup (CaptionRules.from_args reads attributes)."""

    def __init__(self, get):
        self._get = get

    def __getattr__(self, name):
        return self._get(name)
