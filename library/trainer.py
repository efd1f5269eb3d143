"""The LoRA / LoKr training loop behind ``train_network.py`` (sd-scripts compatible).

Order of work: every user-facing check runs in :func:`prepare` before any model is loaded
(a mistake ends with one line and exit code 2); then the model, the network, the optimizer
(via ``library.train_util.get_optimizer``), the schedule, and the loop.

Resuming is bit-exact: the batch order is a pure function of (seed, epoch), the noise and
timesteps come from a dedicated generator whose state is saved with the training state, and
accelerate restores the network, optimizer, scheduler and global RNG states.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import torch

from .errors import TrainingStopped, UserError
from .losses import compute_loss, is_latent_space
from .train_args import EMBEDDED_MODEL

logger = logging.getLogger("train_network")

CACHE_DIR = os.environ.get("HINA_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache"))
STATE_FILE = "train_state.json"


# ----------------------------------------------------------------- checks
def _parse_kv(items, what: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what} item {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_warmup(value, max_steps: int) -> int:
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


def parse_resolution(value) -> int | None:
    if value is None:
        return None
    parts = [p for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--resolution {value!r} must be 'N' or 'N,N'") from None
    if not nums or len(nums) > 2 or (len(nums) == 2 and nums[0] != nums[1]):
        raise UserError(f"--resolution {value!r}: only square resolutions are supported ('512' or '512,512')")
    if nums[0] < 8 or nums[0] % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {nums[0]}")
    return nums[0]


@dataclass
class Plan:
    """What prepare() resolved: everything the loop needs that is not a model."""
    model_path: str
    data_dir: str
    resolution: int | None
    network_module: object
    net_kwargs: dict
    optimizer_cls: object
    optimizer_kwargs: dict
    seed: int
    resume_state: dict | None = None
    embedded: bool = False
    notes: list = field(default_factory=list)


def prepare(args) -> Plan:
    """Validate every user input before anything heavy happens. Raises UserError."""
    from .train_util import resolve_optimizer

    notes = []
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
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
    resolution = parse_resolution(args.resolution)

    # network module
    try:
        module = importlib.import_module(args.network_module)
    except ImportError as e:
        raise UserError(f"--network_module {args.network_module!r} cannot be imported: {e}") from None
    if not hasattr(module, "create_network"):
        raise UserError(f"--network_module {args.network_module!r} has no create_network()")
    if args.network_dim is not None and args.network_dim < 1 and not args.dim_from_weights:
        raise UserError(f"--network_dim must be >= 1 (the rank of each LoRA / LoKr factor), got {args.network_dim}")
    net_kwargs = _parse_kv(args.network_args, "--network_args")
    if args.network_weights and not os.path.isfile(args.network_weights):
        raise UserError(f"--network_weights {args.network_weights!r} does not exist")
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights")

    # optimizer: resolve the class and check its arguments on a dummy parameter
    try:
        cls, kwargs, info = resolve_optimizer(args.optimizer_type, args.optimizer_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if info is not None or getattr(cls, "__module__", "").startswith(("library.", "torch.optim")):
        try:
            cls([torch.nn.Parameter(torch.zeros(2))], lr=args.learning_rate, **kwargs)
        except (ValueError, TypeError) as e:
            raise UserError(f"--optimizer_args for {args.optimizer_type}: {e}") from None

    # model and data: explicit, or the embedded default (generated locally)
    embedded = False
    model_path = args.pretrained_model_name_or_path
    if model_path in (None, "", EMBEDDED_MODEL):
        model_path = os.path.join(CACHE_DIR, "tiny-sd")
        embedded = True
        notes.append(f"no --pretrained_model_name_or_path: using the embedded tiny SD model ({model_path})")
    elif not os.path.isdir(model_path) or not os.path.isfile(os.path.join(model_path, "model_index.json")):
        raise UserError(
            f"--pretrained_model_name_or_path {model_path!r} is not a diffusers model folder "
            "(expected model_index.json with unet/, vae/, text_encoder/, tokenizer/)"
        )
    data_dir = args.train_data_dir
    if data_dir is None and not embedded:
        raise UserError(f"--train_data_dir is required with --pretrained_model_name_or_path {model_path!r} "
                        "(the generated demo data goes only with the embedded tiny model)")
    if data_dir is None:
        data_dir = os.path.join(CACHE_DIR, "demo-data")
        notes.append(f"no --train_data_dir: using a generated captioned dataset ({data_dir})")
    else:
        from .dataset import scan, verify_images

        items, _ = scan(data_dir, args.caption_extension)  # raises UserError when missing or empty
        notes.append(f"--train_data_dir: {verify_images(items)} images read and verified")

    _check_writable("--output_dir", args.output_dir)
    logging_dir = _logging_dir(args)
    if logging_dir:
        _check_writable("--logging_dir" if args.logging_dir else "the log folder (--output_dir/logs)", logging_dir)

    resume_state = _read_resume_state(args.resume, cls, kwargs) if args.resume else None

    seed = args.seed
    if seed is None and resume_state is not None and resume_state.get("seed") is not None:
        seed = int(resume_state["seed"])  # resuming: the saved seed fixes the batch order
        notes.append(f"--resume: using the saved seed {seed}")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % (2**31)
    return Plan(model_path, data_dir, resolution, module, net_kwargs, cls, kwargs, seed, resume_state, embedded, notes)


def _check_writable(what: str, folder: str) -> None:
    """Create ``folder`` and write a probe file in it now, so a folder that cannot hold the results
    ends the run before any model is loaded instead of at the first save."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {folder!r} cannot be written: {e.strerror or e}") from None


def _logging_dir(args) -> str | None:
    """As sd-scripts: --logging_dir alone turns TensorBoard on; --log_with alone logs under output_dir/logs."""
    if args.logging_dir:
        return args.logging_dir
    return os.path.join(args.output_dir, "logs") if args.log_with else None


def _optimizer_identity(cls, kwargs: dict) -> dict:
    """What a saved optimizer state depends on: the class and the width of its state (8 or 32 bit)."""
    return {"optimizer": f"{cls.__module__}.{cls.__name__}", "optim_bits": int(kwargs.get("optim_bits", 32) or 32)}


def _read_resume_state(folder: str, cls, kwargs: dict) -> dict:
    """Read ``train_state.json`` of a state folder written by this trainer; one line for anything else."""
    state_json = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_json):
        raise UserError(f"--resume {folder!r} is not a training state folder (no {STATE_FILE})")
    try:
        with open(state_json, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {folder!r}: {STATE_FILE} cannot be read ({e})") from None
    if isinstance(state, dict) and "global_step" not in state and "current_step" in state:
        raise UserError(
            f"--resume {folder!r} is a kohya sd-scripts state folder (step {state.get('current_step')}); this trainer "
            "resumes only its own states: continue from the LoRA saved with it (--network_weights FILE)")
    try:
        int(state["global_step"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--resume {folder!r}: {STATE_FILE} is damaged (global_step: {e!r})") from None
    now = _optimizer_identity(cls, kwargs)
    saved = {k: state.get(k, now[k]) for k in now}  # states written before optim_bits was recorded
    if saved["optimizer"] != now["optimizer"] and saved["optimizer"].rsplit(".", 1)[-1] != cls.__name__:
        raise UserError(f"--resume {folder!r} was saved by {saved['optimizer']}, not {now['optimizer']}: "
                        "resume with the same --optimizer_type (its state cannot be carried over)")
    if saved["optim_bits"] != now["optim_bits"]:
        raise UserError(f"--resume {folder!r} holds {saved['optim_bits']}-bit optimizer state, this run asks for "
                        f"{now['optim_bits']}-bit: resume with the same optim_bits / --optimizer_type")
    return state


# ---------------------------------------------------------------- helpers
def _atomic_dir_swap(tmp: str, final: str) -> None:
    if os.path.isdir(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _save_dtype(args):
    return {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.save_precision)


def build_metadata(args, plan: Plan, ctx: dict) -> dict:
    md = {
        "ss_session_id": ctx["session_id"],
        "ss_training_started_at": ctx["started_at"],
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": ctx["num_train_images"],
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": ctx["batches_per_epoch"],
        "ss_num_epochs": ctx["num_epochs"],
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": ctx["max_train_steps"],
        "ss_lr_warmup_steps": ctx["warmup_steps"],
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim if args.network_dim is not None else 4,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_network_args": json.dumps(plan.net_kwargs),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_full_bf16": bool(args.full_bf16),
        "ss_v2": bool(args.v2),
        "ss_base_model_version": "sd_v2" if args.v2 else "sd_v1",
        "ss_clip_skip": args.clip_skip,
        "ss_seed": plan.seed,
        "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_optimizer": ctx["optimizer"],
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_loss_type": args.loss_type,
        "ss_resolution": f"({ctx['resolution']}, {ctx['resolution']})",
        "ss_sd_model_name": os.path.basename(os.path.normpath(plan.model_path)),
        "ss_dataset_dirs": json.dumps(ctx["dataset_dirs"]),
        "ss_tag_frequency": json.dumps(ctx["tag_frequency"]),
        "ss_training_comment": args.training_comment,
        "ss_caption_extension": args.caption_extension,
        "ss_steps": ctx["global_step"],
        "ss_epoch": ctx["epoch"],
        "ss_training_finished_at": time.time(),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-v2-512" if args.v2 else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": args.output_name,
        "modelspec.resolution": f"{ctx['resolution']}x{ctx['resolution']}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.no_metadata:
        keep = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
        md = {k: md[k] for k in keep}
    return {k: str(v) for k, v in md.items()}


def _plot_losses(losses, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is a dependency, but plots are optional
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class _Stop(Exception):
    pass


# ------------------------------------------------------------------- train
def train(args, plan: Plan) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from networks.names import attach_param_names, kohya_text_encoder_view

    from .dataset import FolderDataset
    from .train_util import get_optimizer

    started = time.time()
    logging_dir = _logging_dir(args)
    log_with = args.log_with or ("tensorboard" if logging_dir else None)
    try:  # accelerate keeps gradient-accumulation settings in a process-wide singleton: start fresh
        from accelerate.state import GradientState

        GradientState._reset_state()
    except (ImportError, AttributeError):  # pragma: no cover - older accelerate
        pass
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=("tensorboard" if log_with in ("tensorboard", "all") else None) if logging_dir else None,
        project_dir=logging_dir,
        # several processes without CUDA: gloo on CPU (plain `accelerate launch --multi_gpu` works)
        cpu=launched > 1 and not torch.cuda.is_available(),
    )
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
                        "on CPU use `accelerate launch --multi_gpu --num_processes N` or torchrun")
    if accelerator.is_main_process:
        for note in plan.notes:
            logger.info(note)
    set_seed(plan.seed)
    device = accelerator.device

    # embedded default: build the tiny model and the dataset locally (idempotent)
    if plan.embedded:
        from .tiny_sd import build_tiny_sd

        with accelerator.main_process_first():
            build_tiny_sd(plan.model_path, seed=0)
    if args.train_data_dir is None:
        from .dataset_gen import make_dataset

        with accelerator.main_process_first():
            make_dataset(plan.data_dir, n_images=16, resolution=plan.resolution or 64, seed=0)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = plan.model_path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model at {path}: {str(e).splitlines()[0]}") from None
    resolution = plan.resolution or int(unet.config.sample_size) * (2 ** (len(vae.config.block_out_channels) - 1))
    dataset = FolderDataset(plan.data_dir, resolution, args.caption_extension, args.flip_aug)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False)
        m.eval()
    for m in (vae, unet, text_encoder):
        m.to(device)
    if weight_dtype != torch.float32:  # frozen weights in the mixed-precision dtype; the VAE stays fp32
        unet.to(dtype=weight_dtype)
        text_encoder.to(dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
        unet.train()
        text_encoder.train()

    # network
    train_unet = not args.network_train_text_encoder_only
    train_te = not args.network_train_unet_only
    module = plan.network_module
    te_view = kohya_text_encoder_view(text_encoder)  # classic kohya module names under transformers 5
    if args.dim_from_weights:
        network, _ = module.create_network_from_weights(1.0, args.network_weights, vae, te_view, unet, **plan.net_kwargs)
    else:
        network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, te_view, unet,
                                        neuron_dropout=args.network_dropout, **plan.net_kwargs)
    if network is None:
        raise UserError(f"--network_module {args.network_module} created no network")
    network.apply_to(te_view, unet, train_te, train_unet)
    if args.network_weights:
        network.load_weights(args.network_weights)
    if args.gradient_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()
    network.to(device)

    te_lr = args.text_encoder_lr
    te_lr_first = te_lr[0] if isinstance(te_lr, list) and te_lr else te_lr
    try:
        res = network.prepare_optimizer_params(te_lr_first, args.unet_lr, args.learning_rate)
    except TypeError:
        res = network.prepare_optimizer_params(te_lr_first, args.unet_lr)
    groups, descriptions = res if isinstance(res, tuple) else (res, None)
    groups, descriptions = attach_param_names((groups, descriptions), network.named_parameters())
    if not groups or not any(len(list(g["params"])) for g in groups):
        raise UserError("the network has no trainable parameters (check --network_train_* and the lrs)")
    opt_name, opt_args, optimizer = get_optimizer(args, groups)
    if hasattr(optimizer, "set_param_names"):
        optimizer.set_param_names(network.named_parameters())

    # schedule
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.train_batch_size * world  # each rank takes its slice of every global batch
    batches_per_epoch = dataset.batches_per_epoch(global_batch)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps
    if args.max_train_epochs is not None:
        max_steps = args.max_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    warmup = parse_warmup(args.lr_warmup_steps, max_steps)
    _warn_if_optimizer_phases_cover_the_run(optimizer, max_steps)
    sched_kwargs = {}
    if args.lr_scheduler == "cosine_with_restarts":
        sched_kwargs["num_cycles"] = args.lr_scheduler_num_cycles
    if args.lr_scheduler == "polynomial":
        sched_kwargs["power"] = args.lr_scheduler_power
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                 num_training_steps=max_steps, **sched_kwargs)

    # The network is not wrapped in DDP: its forward runs through the hooked U-Net / text
    # encoder, never through the wrapper, so DDP would not synchronise it. Gradients are
    # averaged across processes explicitly (_average_gradients) before each update instead.
    optimizer = accelerator.prepare(optimizer)
    accelerator.register_for_checkpointing(network)
    accelerator.register_for_checkpointing(lr_scheduler)
    net = accelerator.unwrap_model(network)
    base_opt = getattr(optimizer, "optimizer", optimizer)

    gen = torch.Generator(device="cpu").manual_seed(plan.seed)
    flip_gen = torch.Generator(device="cpu").manual_seed(plan.seed + 1)
    global_step, start_epoch, skip_batches = 0, 0, 0
    losses: list[float] = []
    if plan.resume_state is not None:
        accelerator.load_state(args.resume)
        st = plan.resume_state
        global_step = int(st["global_step"])
        start_epoch = int(st["epoch"])
        skip_batches = int(st["batch_in_epoch"])
        losses = list(st.get("losses", []))
        gen_state = torch.load(os.path.join(args.resume, "generators.pt"), weights_only=True)
        gen.set_state(gen_state["noise"])
        flip_gen.set_state(gen_state["flip"])
        logger.info("resumed from %s at step %d", args.resume, global_step)

    # loss options: this trainer compares VAE latents, where an FFT loss has no image meaning
    fourier_active = args.loss_type == "fourier"
    latent_channels = int(vae.config.latent_channels)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    latent_shape = (1, latent_channels, resolution // 8, resolution // 8)
    if fourier_active and not args.fourier_latent_ok and is_latent_space(torch.empty(latent_shape), latent_channels, 8, resolution):
        fourier_active = False
        if accelerator.is_main_process:
            logger.warning("--loss_type fourier: training runs in latent space (%d-channel VAE latents), where the FFT "
                           "loss has no image meaning; it is disabled and the base l2 loss is used "
                           "(pass --fourier_latent_ok to keep it)", latent_channels)

    cached = {}
    if args.cache_latents:
        with torch.no_grad():
            for it in {i.path for i in dataset.items}:
                img = dataset.image(it).unsqueeze(0).to(device)
                cached[it] = vae.encode(img).latent_dist.mode()[0] * scaling

    ctx = {
        "session_id": uuid.uuid4().hex, "started_at": started, "num_train_images": dataset.num_images,
        "batches_per_epoch": batches_per_epoch, "num_epochs": num_epochs, "max_train_steps": max_steps,
        "warmup_steps": warmup, "optimizer": f"{opt_name}({opt_args})", "resolution": resolution,
        "dataset_dirs": dataset.folders, "tag_frequency": dataset.tag_frequency(),
        "global_step": global_step, "epoch": start_epoch,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    ext = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}[args.save_model_as]

    def save_model(name: str) -> str:
        file = os.path.join(args.output_dir, name + ext)
        if accelerator.is_main_process:
            md = build_metadata(args, plan, ctx)
            net.save_weights(file, _save_dtype(args), md)
        return file

    def save_state(name: str, epoch: int, batch_in_epoch: int) -> str:
        final = os.path.join(args.output_dir, name)
        tmp = final + ".tmp"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.save_state(tmp)
        if accelerator.is_main_process:
            torch.save({"noise": gen.get_state(), "flip": flip_gen.get_state()}, os.path.join(tmp, "generators.pt"))
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                           "losses": losses, "seed": plan.seed,
                           **_optimizer_identity(plan.optimizer_cls, plan.optimizer_kwargs)}, f)
            _atomic_dir_swap(tmp, final)
        accelerator.wait_for_everyone()
        return final

    if accelerator.is_main_process and log_with and logging_dir:
        accelerator.init_trackers(args.log_prefix or "network_train",
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    stop_reason = stop_signal = None

    def on_signal(signum, frame):
        nonlocal stop_reason, stop_signal
        stop_reason = stop_signal = signal.Signals(signum).name

    old_handlers = {}
    if threading_main():
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, on_signal)

    progress = tqdm(total=max_steps, initial=global_step, disable=args.no_progress or not accelerator.is_main_process,
                    desc="steps", dynamic_ncols=True)
    bad_steps = 0
    last_good = None
    epoch = start_epoch
    batch_in_epoch = done_batches = skip_batches
    try:
        for epoch in range(start_epoch, num_epochs):
            if global_step >= max_steps:
                break
            net.on_epoch_start(text_encoder, unet) if hasattr(net, "on_epoch_start") else None
            order = dataset.epoch_order(plan.seed, epoch)
            start_b = skip_batches if epoch == start_epoch else 0
            done_batches = start_b
            for b in range(start_b, batches_per_epoch):
                if global_step >= max_steps:
                    break
                batch_in_epoch = b + 1
                start = b * global_batch + rank * args.train_batch_size
                idx = [order[(start + j) % len(order)] for j in range(args.train_batch_size)]
                if world == 1:
                    idx = idx[: max(1, len(order) - b * global_batch)]  # a short last batch, as before
                with accelerator.accumulate(network):
                    if hasattr(net, "on_step_start"):
                        net.on_step_start(text_encoder, unet)
                    loss = _micro_step(args, dataset, idx, cached, vae, text_encoder, unet, tokenizer, noise_scheduler,
                                       gen, flip_gen, device, weight_dtype, scaling, global_step, fourier_active,
                                       accelerator, train_te, world, rank)
                    finite = bool(torch.isfinite(loss.detach()))
                    if finite:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and world > 1:
                            _average_gradients(net)
                        if accelerator.sync_gradients and args.max_grad_norm and args.max_grad_norm > 0:
                            total = accelerator.clip_grad_norm_(net.get_trainable_params(), args.max_grad_norm)
                            if total is not None and not bool(torch.isfinite(torch.as_tensor(total))):
                                finite = False  # non-finite gradients: skip this update
                        if finite:
                            optimizer.step()
                            if accelerator.sync_gradients and hasattr(base_opt, "report_loss"):
                                base_opt.report_loss(loss.detach())  # once per real update
                    optimizer.zero_grad(set_to_none=True)
                if not finite:
                    bad_steps += 1
                    logger.warning("step %d: non-finite loss or gradients (loss %s), update skipped (%d in a row)",
                                   global_step + 1, float(loss.detach()), bad_steps)
                    if bad_steps >= args.max_bad_steps:
                        stop_reason = f"{bad_steps} consecutive non-finite losses"
                        raise _Stop()
                    continue
                bad_steps = 0
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                global_step += 1
                done_batches = batch_in_epoch
                ctx["global_step"], ctx["epoch"] = global_step, epoch + 1
                lv = float(loss.detach())
                losses.append(lv)
                if args.scale_weight_norms and hasattr(net, "apply_max_norm_regularization"):
                    net.apply_max_norm_regularization(args.scale_weight_norms, device)
                lr_now = lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{lv:.4f}", lr=f"{lr_now:.2e}", refresh=False)
                if accelerator.is_main_process and log_with and logging_dir:
                    logs = {"loss/current": lv, "loss/average": sum(losses[-50:]) / len(losses[-50:])}
                    for i, lr_i in enumerate(lr_scheduler.get_last_lr()):
                        desc = descriptions[i] if descriptions and i < len(descriptions) else f"group{i}"
                        logs[f"lr/{desc}"] = lr_i
                    if args.optimizer_log_every and global_step % args.optimizer_log_every == 0 and hasattr(base_opt, "diagnostics_scalars"):
                        logs.update(base_opt.diagnostics_scalars())
                    accelerator.log(logs, step=global_step)
                if args.save_every_n_steps and global_step % args.save_every_n_steps == 0 and global_step < max_steps:
                    save_model(f"{args.output_name}-step{global_step:08d}")
                    if args.save_state:
                        last_good = save_state(f"{args.output_name}-step{global_step:08d}-state", epoch, batch_in_epoch)
                if stop_reason:
                    raise _Stop()
            if (args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0
                    and global_step < max_steps):
                save_model(f"{args.output_name}-{epoch + 1:06d}")
                if args.save_state:
                    last_good = save_state(f"{args.output_name}-{epoch + 1:06d}-state", epoch + 1, 0)
    except _Stop:
        progress.close()
        saved = _save_interrupted(save_model, save_state, args.output_name, epoch, batch_in_epoch)
        accelerator.end_training()
        _restore(old_handlers)
        raise TrainingStopped(f"training stopped ({stop_reason}) at step {global_step}: {saved}"
                              + (f"; last periodic state {last_good}" if last_good else ""), stop_signal) from None
    except Exception as e:  # a late failure (unreadable image, out of memory, ...): save first
        progress.close()
        saved = _save_interrupted(save_model, save_state, args.output_name, epoch, done_batches)
        _restore(old_handlers)
        if isinstance(e, UserError):
            raise UserError(f"{e} (at step {global_step}: {saved})") from None
        logger.error("training failed at step %d (%s: %s): %s", global_step, type(e).__name__, e, saved)
        raise
    progress.close()
    _restore(old_handlers)

    if world > 1:
        _check_ranks_in_sync(accelerator, net)
    final = save_model(args.output_name)
    state_dir = None
    if args.save_state or args.save_state_on_train_end:
        state_dir = save_state(f"{args.output_name}-state", epoch + (1 if batch_in_epoch >= batches_per_epoch else 0),
                               0 if batch_in_epoch >= batches_per_epoch else batch_in_epoch)
    if accelerator.is_main_process:
        _remove_stale_interrupted(args.output_dir, args.output_name, ext)
    plot = _plot_losses(losses, os.path.join(args.output_dir, f"{args.output_name}_loss.png")) if accelerator.is_main_process and losses else None
    accelerator.end_training()
    elapsed = time.time() - started
    summary = {
        "file": final, "state": state_dir, "loss_plot": plot, "steps": global_step,
        "final_loss": losses[-1] if losses else None, "seconds": elapsed, "optimizer": opt_name,
        "optimizer_object": base_opt, "network": net, "losses": losses,
    }
    if accelerator.is_main_process:
        tail = losses[-10:] if losses else [float("nan")]
        print(f"done: {global_step} steps in {elapsed:.1f}s | loss {losses[0] if losses else float('nan'):.4f} -> "
              f"{sum(tail) / len(tail):.4f} (mean of last {len(tail)}) | {type(base_opt).__name__} | saved {final}"
              + (f" | curve {plot}" if plot else ""))
    return summary


def _save_interrupted(save_model, save_state, output_name: str, epoch: int, batch_in_epoch: int) -> str:
    """Save the LoRA and the training state as ``<name>-interrupted``; never raises (it runs while
    another error is on its way out), and says what it saved or why it could not."""
    try:
        file = save_model(f"{output_name}-interrupted")
        state_dir = save_state(f"{output_name}-interrupted-state", epoch, batch_in_epoch)
    except Exception as e:  # pragma: no cover - disk full or gone while saving
        logger.error("the emergency save failed too: %s", e)
        return f"the emergency save failed ({type(e).__name__}: {e})"
    return f"saved {file} and {state_dir} (resume with --resume {state_dir})"


def _remove_stale_interrupted(output_dir: str, output_name: str, ext: str) -> None:
    """A run that finished supersedes the ``-interrupted`` LoRA and state an earlier stop left."""
    for path in (os.path.join(output_dir, f"{output_name}-interrupted{ext}"),
                 os.path.join(output_dir, f"{output_name}-interrupted-state")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path):
            os.remove(path)
        else:
            continue
        logger.info("removed %s: this run finished after it", path)


def _average_gradients(net) -> None:
    """All-reduce (mean) the gradients of the trainable parameters in one flat buffer."""
    import torch.distributed as dist

    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def _check_ranks_in_sync(accelerator, net) -> None:
    """Compare per-tensor checksums of the trained parameters across processes."""
    with torch.no_grad():
        sums = torch.stack([t for p in net.parameters() for t in (p.float().sum(), p.float().abs().sum())])
        rows = accelerator.gather(sums.to(accelerator.device).unsqueeze(0))
    if accelerator.is_main_process:
        if bool((rows == rows[0]).all()):
            logger.info("parameters identical on all %d ranks", rows.shape[0])
        else:
            logger.error("parameters differ between ranks (max checksum gap %.3g)", float((rows - rows[0]).abs().max()))


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _restore(handlers):
    for s, h in handlers.items():
        signal.signal(s, h)


def _draw(fn, shape, gen, world: int, rank: int):
    """Draw for the whole global batch from the shared generator and keep this rank's slice:
    N processes with batch B see exactly the noise of one process with batch N*B."""
    if world == 1:
        return fn(shape, gen)
    full = fn((shape[0] * world,) + tuple(shape[1:]), gen)
    return full[rank * shape[0]:(rank + 1) * shape[0]]


_PHASE_LENGTHS = ("warmup_steps", "wd_transition_steps")


def _warn_if_optimizer_phases_cover_the_run(optimizer, max_steps: int) -> None:
    """One line when an optimizer's warmup / transition length is more than half the run: its
    lr-mask adaptation, early-phase techniques or decay schedule would then span most of it."""
    defaults = getattr(optimizer, "defaults", {})
    long = {k: defaults[k] for k in _PHASE_LENGTHS if isinstance(defaults.get(k), int) and 2 * defaults[k] > max_steps}
    if long:
        logger.warning("%s over %d training steps: %s more than half the run; scale them to the run "
                       "(--optimizer_args) if that is not intended", type(optimizer).__name__, max_steps,
                       ", ".join(f"{k}={v}" for k, v in long.items()) + (" is" if len(long) == 1 else " are"))


def _micro_step(args, dataset, idx, cached, vae, text_encoder, unet, tokenizer, noise_scheduler, gen, flip_gen, device,
                weight_dtype, scaling, global_step, fourier_active, accelerator, train_te, world=1, rank=0):
    images, captions = dataset.batch(idx, flip_gen)
    randn = lambda shape, g: torch.randn(shape, generator=g)  # noqa: E731
    with torch.no_grad():
        if cached:
            latents = torch.stack([cached[dataset.items[i].path] for i in idx])
        else:
            dist = vae.encode(images.to(device, dtype=torch.float32)).latent_dist
            eps = _draw(randn, dist.mean.shape, gen, world, rank).to(device)
            latents = (dist.mean + dist.std * eps) * scaling
    bsz = latents.shape[0]
    noise = _draw(randn, latents.shape, gen, world, rank).to(device)
    if args.noise_offset:
        noise = noise + args.noise_offset * _draw(randn, (bsz, latents.shape[1], 1, 1), gen, world, rank).to(device)
    steps_n = noise_scheduler.config.num_train_timesteps
    timesteps = _draw(lambda shape, g: torch.randint(0, steps_n, shape, generator=g), (bsz,), gen, world, rank).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with accelerator.autocast():
        with torch.set_grad_enabled(train_te):
            if args.clip_skip and args.clip_skip > 1:
                out = text_encoder(ids, output_hidden_states=True)
                enc = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-args.clip_skip])
            else:
                enc = text_encoder(ids)[0]
        pred = unet(noisy.to(weight_dtype), timesteps, enc.to(weight_dtype)).sample
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if args.v_parameterization else noise
    if args.min_snr_gamma:
        alphas = noise_scheduler.alphas_cumprod.to(device)[timesteps]
        snr = alphas / (1 - alphas)
        w = torch.clamp(snr, max=args.min_snr_gamma) / (snr + 1 if args.v_parameterization else snr)
        per = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        return (per * w).mean()
    return compute_loss(pred, target, args.loss_type, global_step, args.huber_c, args.fourier_weight,
                        args.fourier_warmup_steps, fourier_active)
