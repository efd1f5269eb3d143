"""Every user-facing check, run before any model is loaded: the arguments become a :class:`Plan`.

A mistake ends with one line naming the culprit (:class:`~library.errors.UserError`, exit code 2
at the command line) before anything heavy happens.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..train_args import EMBEDDED_MODEL, EMBEDDED_SDXL_MODEL
from .checkpoint import read_resume_state
from .models import read_geometry

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cache_dir() -> str:
    """Where the embedded tiny model and the generated dataset live (``HINA_CACHE_DIR`` or ``.cache``)."""
    return os.environ.get("HINA_CACHE_DIR", os.path.join(_ROOT, ".cache"))


@dataclass
class Plan:
    """What prepare() resolved: everything the loop needs that is not a model."""
    model_path: str
    data_dir: str
    resolution: tuple[int, int]  # (width, height): --resolution, or the model's native size
    network_module: object
    net_kwargs: dict
    optimizer_cls: object
    optimizer_kwargs: dict
    seed: int
    resume_state: dict | None = None
    embedded: bool = False
    notes: list = field(default_factory=list)
    buckets: object = None  # library.buckets.Buckets with --enable_bucket
    subsets: list | None = None  # library.dataset.Subset list: --dataset_config, or folders with --reg_data_dir


def prepare(args) -> Plan:
    """Validate every user input before anything heavy happens. Raises UserError."""
    notes: list[str] = []
    _kohya_compat(args, notes)
    config_subsets = _dataset_config(args, notes)
    _check_numbers(args)
    resolution = parse_resolution(args.resolution)
    module, net_kwargs = _network_module(args)
    cls, kwargs = _optimizer(args)
    _check_scheduler(args, cls, kwargs)
    model_path, embedded = _model(args, notes)
    data_dir, subsets = _data(args, model_path, embedded, config_subsets, notes)
    _check_cached_prompts(args, subsets)
    if args.sample_prompts:
        from ..sample_prompts import load_prompts

        notes.append(f"--sample_prompts: {len(load_prompts(args.sample_prompts))} prompt(s)")
    shape = read_geometry(model_path, embedded, args.v2, getattr(args, "sdxl", False))
    resolution = resolution or (shape.native_resolution,) * 2
    buckets = _buckets(args, resolution, shape.pixel_multiple, notes)
    _check_outputs(args)
    resume_state = read_resume_state(args.resume, cls, kwargs) if args.resume else None
    seed = _seed(args, resume_state, notes)
    return Plan(model_path, data_dir, resolution, module, net_kwargs, cls, kwargs, seed, resume_state, embedded,
                notes, buckets, subsets)


def parse_kv(items, what: str) -> dict:
    """``["k=v", ...]`` -> ``{"k": "v"}``; an item without ``=`` is a one-line error naming it."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what} item {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_warmup(value, max_steps: int) -> int:
    """``--lr_warmup_steps`` as sd-scripts reads it: steps, a ratio of the run (0 < r < 1) or a percentage."""
    s = str(value).strip()
    try:
        if s.endswith("%"):
            return int(round(float(s[:-1]) / 100.0 * max_steps))
        f = float(s)
    except ValueError:
        raise UserError(f"--lr_warmup_steps {value!r} must be a number of steps, a ratio or a percentage") from None
    if f < 0:
        raise UserError(f"--lr_warmup_steps must be >= 0, got {value!r}")
    return int(round(f * max_steps)) if 0 < f < 1 else int(f)


def parse_resolution(value) -> tuple[int, int] | None:
    """``--resolution`` as sd-scripts reads it: ``N`` (square) or ``W,H``; sides multiples of 8."""
    if value is None:
        return None
    parts = [p for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--resolution {value!r} must be 'N' or 'W,H'") from None
    if not nums or len(nums) > 2:
        raise UserError(f"--resolution {value!r} must be 'N' or 'W,H' (e.g. '512' or '512,768')")
    for n in nums:
        if n < 8 or n % 8:
            raise UserError(f"--resolution must be a multiple of 8, got {n}")
    return (nums[0], nums[-1])


def _buckets(args, resolution: tuple[int, int], multiple: int, notes: list):
    """``--enable_bucket`` and its options checked as sd-scripts checks them -> Buckets (or None)."""
    from ..buckets import Buckets

    if not args.enable_bucket:
        return None
    step = args.bucket_reso_steps
    if step < 1 or step % multiple:
        raise UserError(f"--bucket_reso_steps must be a multiple of {multiple} for this model (its VAE and "
                        f"U-Net halve an image {multiple.bit_length() - 1} times), got {step}")
    if args.bucket_no_upscale:
        notes.append("--bucket_no_upscale: buckets follow each image's size; --min/--max_bucket_reso are not used")
        return Buckets(resolution, 0, 0, step, no_upscale=True)
    low = args.min_bucket_reso - args.min_bucket_reso % step
    high = args.max_bucket_reso + (-args.max_bucket_reso) % step
    if (low, high) != (args.min_bucket_reso, args.max_bucket_reso):
        notes.append(f"--min/--max_bucket_reso rounded to multiples of --bucket_reso_steps {step}: {low}, {high}")
    if low < step:
        raise UserError(f"--min_bucket_reso must be at least --bucket_reso_steps ({step}), got {args.min_bucket_reso}")
    if min(resolution) < low or max(resolution) > high:
        raise UserError(f"--resolution {resolution[0]}x{resolution[1]} must lie within --min_bucket_reso {low} and "
                        f"--max_bucket_reso {high} (lower the min, raise the max, or change the resolution)")
    return Buckets(resolution, low, high, step, no_upscale=False)


# options sd-scripts users pass that change nothing here, with what to tell them
_NOTHING_TO_DO = {
    "sdpa": "--sdpa: PyTorch's scaled-dot-product attention is already the default here",
    "mem_eff_attn": "--mem_eff_attn: PyTorch's scaled-dot-product attention is already memory efficient",
    "lowram": "--lowram: models load on the CPU and move to the device once; nothing to change",
    "highvram": "--highvram: nothing to change here",
    "max_data_loader_n_workers": "--max_data_loader_n_workers: images are decoded once in the training process "
                                 "and kept in memory; no data-loader workers are used",
    "persistent_data_loader_workers": "--persistent_data_loader_workers: no data-loader workers are used",
}


def _kohya_compat(args, notes: list) -> None:
    """sd-scripts' older spellings and options, mapped to what they mean here (as sd-scripts does)."""
    if getattr(args, "caption_extention", None) is not None:
        args.caption_extension = args.caption_extention
    if getattr(args, "use_8bit_adam", False):
        if args.optimizer_type:
            raise UserError("--use_8bit_adam and --optimizer_type exclude each other (as in sd-scripts): give one")
        args.optimizer_type = "AdamW8bit"
    for name, note in _NOTHING_TO_DO.items():
        if getattr(args, name, None):
            notes.append(note)
    if getattr(args, "xformers", False) and not xformers_usable():
        notes.append("--xformers: xformers with CUDA is not available; PyTorch's scaled-dot-product attention is used")
    if getattr(args, "log_with", None) in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        if args.log_with == "wandb":
            raise UserError("--log_with wandb needs the wandb package: pip install wandb (or use tensorboard)")
        notes.append("--log_with all: wandb is not installed, logging to TensorBoard only")


def xformers_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None


def _check_numbers(args) -> None:
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if (args.cache_latents or args.cache_latents_to_disk) and (args.color_aug or args.random_crop):
        raise UserError("--cache_latents cannot go with --color_aug or --random_crop (the cached latents would be "
                        "of one fixed image), as in sd-scripts")
    if getattr(args, "cache_text_encoder_outputs", False) and not args.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only (cached text encoder outputs "
                        "cannot carry a text encoder LoRA's gradients)")
    for name in ("train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_train_epochs is None and (args.max_train_steps is None or args.max_train_steps < 1):
        raise UserError("--max_train_steps must be >= 1 (or give --max_train_epochs)")
    if args.max_train_epochs is not None and args.max_train_epochs < 1:
        raise UserError(f"--max_train_epochs must be >= 1, got {args.max_train_epochs}")
    if args.learning_rate is None or not math.isfinite(args.learning_rate) or args.learning_rate < 0:
        raise UserError(f"--learning_rate must be a finite number >= 0, got {args.learning_rate}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if args.network_dim is not None and args.network_dim < 1 and not args.dim_from_weights:
        raise UserError(f"--network_dim must be >= 1 (the rank of each LoRA / LoKr factor), got {args.network_dim}")


def _network_module(args):
    """The ``--network_module`` (imported, with ``create_network``) and its ``--network_args``."""
    try:
        module = importlib.import_module(args.network_module)
    except ImportError as e:
        raise UserError(f"--network_module {args.network_module!r} cannot be imported: {e}") from None
    if not hasattr(module, "create_network"):
        raise UserError(f"--network_module {args.network_module!r} has no create_network()")
    net_kwargs = parse_kv(args.network_args, "--network_args")
    if args.network_weights and not os.path.isfile(args.network_weights):
        raise UserError(f"--network_weights {args.network_weights!r} does not exist")
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights")
    return module, net_kwargs


def _optimizer(args):
    """Resolve the optimizer class and check its arguments on a dummy parameter."""
    from ..train_util import resolve_optimizer

    try:
        cls, kwargs, info = resolve_optimizer(args.optimizer_type, args.optimizer_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if info is not None or getattr(cls, "__module__", "").startswith(("library.", "torch.optim")):
        try:
            cls([torch.nn.Parameter(torch.zeros(2))], lr=args.learning_rate, **kwargs)
        except (ValueError, TypeError) as e:
            raise UserError(f"--optimizer_args for {args.optimizer_type or 'AdamW'}: {e}") from None
    return cls, kwargs


def _check_scheduler(args, optimizer_cls, optimizer_kwargs: dict) -> None:
    """``--lr_scheduler_type`` importable with its ``--lr_scheduler_args``; ``adafactor`` only with Adafactor."""
    if args.lr_scheduler_type:
        scheduler_class(args)
        scheduler_kwargs(args)
    if args.lr_scheduler == "adafactor" and optimizer_cls.__name__ != "Adafactor":
        raise UserError("--lr_scheduler adafactor goes with --optimizer_type Adafactor (relative_step=True), "
                        f"not {optimizer_cls.__name__}")


def scheduler_class(args):
    """The class ``--lr_scheduler_type`` names (``module.Class``; a bare name is looked up in
    ``torch.optim.lr_scheduler``); one line when it cannot be imported."""
    module, _, name = args.lr_scheduler_type.rpartition(".")
    try:
        return getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"--lr_scheduler_type {args.lr_scheduler_type!r} cannot be imported: {e}") from None


def scheduler_kwargs(args) -> dict:
    """``--lr_scheduler_args`` values as Python literals where they are one (sd-scripts reads them so)."""
    import ast

    out = {}
    for key, value in parse_kv(args.lr_scheduler_args, "--lr_scheduler_args").items():
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _model(args, notes: list) -> tuple[str, bool]:
    """The model: a single-file checkpoint, a diffusers folder, a Hugging Face id, or the embedded
    default (generated locally). A single ``.safetensors`` is checked now against ``--v2``."""
    from ..single_file import check_family, is_single_file, peek

    model_path = args.pretrained_model_name_or_path
    sdxl = getattr(args, "sdxl", False)
    embedded = model_path in (None, "", EMBEDDED_MODEL, EMBEDDED_SDXL_MODEL)
    if embedded:
        model_path = os.path.join(cache_dir(), EMBEDDED_SDXL_MODEL if sdxl else EMBEDDED_MODEL)
        notes.append(f"no --pretrained_model_name_or_path: using the embedded tiny {'SDXL' if sdxl else 'SD'} "
                     f"model ({model_path})")
    elif os.path.isfile(model_path):
        if not is_single_file(model_path):
            raise UserError(f"--pretrained_model_name_or_path {model_path!r} is a file but not a checkpoint "
                            "(.safetensors or .ckpt)")
        family, _ = peek(model_path)
        if family is not None or model_path.lower().endswith(".safetensors"):
            check_family(model_path, family, args.v2, sdxl)
    elif os.path.isdir(model_path):
        _check_diffusers_folder(model_path, sdxl)
    elif not _looks_like_hub_id(model_path):
        raise UserError(f"--pretrained_model_name_or_path {model_path!r} does not exist (give a .safetensors / .ckpt "
                        "checkpoint, a diffusers folder or a Hugging Face id such as owner/name)")
    if args.vae and not os.path.exists(args.vae) and not _looks_like_hub_id(args.vae):
        raise UserError(f"--vae {args.vae!r} does not exist")
    return model_path, embedded


def _check_diffusers_folder(path: str, sdxl: bool) -> None:
    """A diffusers folder, of the pipeline this script trains (SD 1.x/2.x or SDXL)."""
    import json

    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise UserError(f"--pretrained_model_name_or_path {path!r} is not a diffusers model folder "
                        "(expected model_index.json with unet/, vae/, text_encoder/, tokenizer/)")
    try:
        with open(index, encoding="utf-8") as f:
            is_xl = "XL" in str(json.load(f).get("_class_name", ""))
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"--pretrained_model_name_or_path {path!r}: model_index.json cannot be read ({e})") from None
    if is_xl and not sdxl:
        raise UserError(f"--pretrained_model_name_or_path {path!r} is an SDXL model: train it with sdxl_train_network.py")
    if sdxl and not is_xl:
        raise UserError(f"--pretrained_model_name_or_path {path!r} is not an SDXL model: train it with train_network.py")


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and "\\" not in value


def _check_cached_prompts(args, subsets) -> None:
    """Cached text-encoder outputs hold one encoding per caption: captions that change from step to
    step (shuffled, dropped) cannot use them (sd-scripts has the same rule)."""
    from ..captions import CaptionRules

    if not getattr(args, "cache_text_encoder_outputs", False):
        return
    rules = [s.captions for s in subsets] if subsets else [CaptionRules.from_args(args)]
    if any(r is not None and (r.random or r.dropout_every_n_epochs) for r in rules):
        raise UserError("--cache_text_encoder_outputs cannot go with captions that change between steps "
                        "(shuffle_caption, caption dropout, tag dropout): drop one or the other")


def _dataset_config(args, notes: list):
    """``--dataset_config``: its subsets, with its dataset-level settings applied to ``args``."""
    if not getattr(args, "dataset_config", None):
        return None
    from ..dataset_config import load_dataset_config

    subsets, settings = load_dataset_config(args.dataset_config, args)
    for option, value in settings.items():
        setattr(args, option, value)
    ignored = [f"--{k}" for k in ("train_data_dir", "reg_data_dir") if getattr(args, k, None)]
    if ignored:
        notes.append(f"--dataset_config given: {', '.join(ignored)} ignored, as in sd-scripts")
    return subsets


def _data(args, model_path: str, embedded: bool, subsets, notes: list):
    """(data folder, subsets): the images to train on, every one verified now; the generated
    dataset with the embedded model when nothing else is given."""
    from ..captions import CaptionRules
    from ..dataset import gather, kohya_subsets, scan, verify_images

    data_dir = args.train_data_dir
    if subsets is None and getattr(args, "reg_data_dir", None):
        options = dict(captions=CaptionRules.from_args(args), flip_aug=args.flip_aug, color_aug=args.color_aug,
                       random_crop=args.random_crop)
        subsets = (kohya_subsets(data_dir, args.caption_extension, **options)
                   + kohya_subsets(args.reg_data_dir, args.caption_extension, is_reg=True, what="--reg_data_dir",
                                   **options))
    if subsets is not None:
        items, _, reg = gather(subsets)
        if not any(not it.is_reg for it in items):
            raise UserError("the dataset holds no training images (only regularisation images or empty folders)")
        notes.append(f"{verify_images(items)} images read and verified ({len(reg)} regularisation folder(s))")
        return (data_dir if not getattr(args, "dataset_config", None) else None), subsets
    if data_dir is None and not embedded:
        raise UserError(f"--train_data_dir is required with --pretrained_model_name_or_path {model_path!r} "
                        "(the generated demo data goes only with the embedded tiny model)")
    if data_dir is None:
        data_dir = os.path.join(cache_dir(), "demo-data")
        notes.append(f"no --train_data_dir: using a generated captioned dataset ({data_dir})")
    else:
        items, _ = scan(data_dir, args.caption_extension)  # raises UserError when missing or empty
        notes.append(f"--train_data_dir: {verify_images(items)} images read and verified")
    return data_dir, None


def logging_dir(args) -> str | None:
    """As sd-scripts: --logging_dir alone turns TensorBoard on; --log_with alone logs under output_dir/logs."""
    if args.logging_dir:
        return args.logging_dir
    return os.path.join(args.output_dir, "logs") if args.log_with else None


def _check_outputs(args) -> None:
    check_writable("--output_dir", args.output_dir)
    folder = logging_dir(args)
    if folder:
        check_writable("--logging_dir" if args.logging_dir else "the log folder (--output_dir/logs)", folder)


def check_writable(what: str, folder: str) -> None:
    """Create ``folder`` and write a probe file in it now, so a folder that cannot hold the results
    ends the run before any model is loaded instead of at the first save."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {folder!r} cannot be written: {e.strerror or e}") from None


def _seed(args, resume_state: dict | None, notes: list) -> int:
    """``--seed``; when resuming without one, the saved seed (it fixes the batch order); else a random one."""
    if args.seed is not None:
        return args.seed
    if resume_state is not None and resume_state.get("seed") is not None:
        notes.append(f"--resume: using the saved seed {int(resume_state['seed'])}")
        return int(resume_state["seed"])
    return int.from_bytes(os.urandom(4), "little") % (2**31)
