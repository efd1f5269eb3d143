"""The trained part: the LoRA / LoKr network, its optimizer with named parameter groups, and the schedule."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..errors import UserError
from .models import Models
from .options import parse_warmup

logger = logging.getLogger("train_network")

# optimizer arguments measured in steps whose phase should not span most of a run
_PHASE_LENGTHS = ("warmup_steps", "wd_transition_steps")
# below this lr the Automagic family's defaults train slowly (its lr mask reaches at most 10x the
# lr, only during warmup) unless the hypergradient lr scale may raise each tensor's lr:
# docs/automagic.md, "Training quality", and the lr-sensitivity tables of docs/benchmarks.md
AUTOMAGIC_LOW_LR = 3e-4


def build_network(args, plan, models: Models):
    """Create the network (or rebuild it from ``--network_weights`` with ``--dim_from_weights``),
    hook it into the U-Net / text encoder, load starting weights, and move it to the device."""
    from networks.names import kohya_text_encoder_view

    module = plan.network_module
    # classic kohya module names under transformers 5; SDXL's two encoders become lora_te1_ / lora_te2_
    te_view = kohya_text_encoder_view(models.text_encoders if models.sdxl else models.text_encoder)
    if args.dim_from_weights:
        network, _ = module.create_network_from_weights(1.0, args.network_weights, models.vae, te_view, models.unet,
                                                        **plan.net_kwargs)
    else:
        network = module.create_network(1.0, args.network_dim, args.network_alpha, models.vae, te_view, models.unet,
                                        neuron_dropout=args.network_dropout, **plan.net_kwargs)
    if network is None:
        raise UserError(f"--network_module {args.network_module} created no network")
    network.apply_to(te_view, models.unet, not args.network_train_unet_only, not args.network_train_text_encoder_only)
    if args.network_weights:
        network.load_weights(args.network_weights)
    if args.gradient_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()
    network.to(models.device)
    return network


def build_optimizer(args, network):
    """``(name, args string, optimizer, group descriptions)``: the network's groups (with the
    per-group lrs sd-scripts gives them and a name for every parameter) into ``get_optimizer``."""
    from networks.names import attach_param_names

    from ..train_util import get_optimizer

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
    name, args_str, optimizer = get_optimizer(args, groups)
    if hasattr(optimizer, "set_param_names"):
        optimizer.set_param_names(network.named_parameters())
    return name, args_str, optimizer, descriptions


@dataclass(frozen=True)
class Schedule:
    """How many batches, updates and epochs the run has."""
    world: int
    global_batch: int  # batches are drawn for all processes at once; each takes its slice
    batches_per_epoch: int
    max_steps: int
    num_epochs: int
    warmup_steps: int


def plan_schedule(args, dataset, world: int) -> Schedule:
    global_batch = args.train_batch_size * world
    batches_per_epoch = dataset.batches_per_epoch(global_batch)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps
    if args.max_train_epochs is not None:
        max_steps = args.max_train_epochs * updates_per_epoch
    return Schedule(world, global_batch, batches_per_epoch, max_steps, math.ceil(max_steps / updates_per_epoch),
                    parse_warmup(args.lr_warmup_steps, max_steps))


def build_lr_scheduler(args, optimizer, schedule: Schedule):
    """As sd-scripts: ``--lr_scheduler_type`` (any class, with ``--lr_scheduler_args``), Adafactor's
    own schedule when it sets its lr itself (``relative_step``), else diffusers' named schedules."""
    from diffusers.optimization import get_scheduler

    from .options import scheduler_class, scheduler_kwargs

    if args.lr_scheduler_type:
        return scheduler_class(args)(optimizer, **scheduler_kwargs(args))
    if args.lr_scheduler == "adafactor" or _relative_step(optimizer):
        from transformers.optimization import AdafactorSchedule

        if args.lr_scheduler != "adafactor":
            logger.info("Adafactor with relative_step sets its own lr: using its schedule, as sd-scripts does")
        return AdafactorSchedule(optimizer, initial_lr=args.learning_rate)
    kwargs = {}
    if args.lr_scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = args.lr_scheduler_num_cycles
    if args.lr_scheduler == "polynomial":
        kwargs["power"] = args.lr_scheduler_power
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=schedule.warmup_steps,
                         num_training_steps=schedule.max_steps, **kwargs)


def _relative_step(optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(getattr(optimizer, "defaults", {}).get("relative_step"))


def warn_if_lr_is_low_for_automagic(optimizer) -> None:
    """One line when an Automagic_CameAMP-family optimizer runs every group below
    ``AUTOMAGIC_LOW_LR`` with the hypergradient lr scale off (the lineage recommended 1e-4 to 1e-5)."""
    from ..optimizers.automagic import Automagic_CameAMP

    if not isinstance(optimizer, Automagic_CameAMP) or optimizer.defaults.get("use_hypergrad"):
        return
    top = max((g["lr"] for g in optimizer.param_groups), default=0.0)
    if 0.0 < top < AUTOMAGIC_LOW_LR:
        logger.warning("%s at lr %.3g with use_hypergrad=False trains slowly below %.0e (its defaults were chosen "
                       "at 1e-3); pass --optimizer_args use_hypergrad=True to let each tensor's lr adapt, or raise "
                       "the lr (docs/automagic.md)", type(optimizer).__name__, top, AUTOMAGIC_LOW_LR)


def warn_if_optimizer_phases_cover_the_run(optimizer, max_steps: int) -> None:
    """One line when an optimizer's warmup / transition length is more than half the run: its
    lr-mask adaptation, early-phase techniques or decay schedule would then span most of it."""
    defaults = getattr(optimizer, "defaults", {})
    long = {k: defaults[k] for k in _PHASE_LENGTHS if isinstance(defaults.get(k), int) and 2 * defaults[k] > max_steps}
    if long:
        logger.warning("%s over %d training steps: %s more than half the run; scale them to the run "
                       "(--optimizer_args) if that is not intended", type(optimizer).__name__, max_steps,
                       ", ".join(f"{k}={v}" for k, v in long.items()) + (" is" if len(long) == 1 else " are"))
