"""The training loop: set a run up from a :class:`~library.trainer.options.Plan`, train it epoch by
epoch, and save on every way out (the end, a signal, too many non-finite steps, a late failure)."""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass

import torch

from ..dataset import Augment
from ..errors import TrainingStopped, UserError
from ..losses import is_latent_space
from . import step as step_mod
from .checkpoint import Checkpointer, optimizer_identity
from .data import build_dataset, cache_latents, rank_share
from .distributed import average_gradients, check_ranks_in_sync
from .logs import RunLog, plot_losses, summary_line
from .metadata import RunFacts, build_metadata, file_keys, weights_dim_alpha
from .models import Models, ensure_embedded, load_models, place
from .network import (Schedule, build_lr_scheduler, build_network, build_optimizer, plan_schedule,
                      warn_if_lr_is_low_for_automagic, warn_if_optimizer_phases_cover_the_run)
from .options import Plan, logging_dir, xformers_usable
from .samples import Sampler
from .signals import StopRequests
from .state import TrainingState

logger = logging.getLogger("train_network")


class _Stop(Exception):
    """Raised inside the loop to stop after saving (a signal, or too many non-finite steps)."""


@dataclass
class Run:
    """Everything one training run holds while it trains."""
    args: object
    plan: Plan
    accelerator: object
    models: Models
    dataset: object
    network: object  # unwrapped
    optimizer: object  # as accelerate prepared it
    lr_scheduler: object
    schedule: Schedule
    state: TrainingState
    loss: step_mod.DiffusionLoss
    draws: step_mod.Draws
    augment: Augment = None
    checkpoints: Checkpointer = None
    log: RunLog = None
    sampler: Sampler = None
    optimizer_name: str = ""
    start_batch: int = 0  # first batch of the first epoch (resuming mid-epoch)
    last_periodic_state: str | None = None
    started: float = 0.0

    @property
    def base_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)


def train(args, plan: Plan) -> dict:
    """Train as ``args`` say; returns a summary (files written, losses, the optimizer and network)."""
    run = set_up(args, plan)
    st = run.state
    with StopRequests() as stops:
        try:
            if st.global_step == 0:
                run.sampler.maybe_sample(0)  # --sample_at_first
            run_epochs(run, stops)
        except _Stop:
            run.log.close()
            saved = run.checkpoints.save_interrupted(st.epoch, st.batch_in_epoch)
            run.accelerator.end_training()
            last = f"; last periodic state {run.last_periodic_state}" if run.last_periodic_state else ""
            raise TrainingStopped(f"training stopped ({stops.reason}) at step {st.global_step}: {saved}{last}",
                                  stops.signal_name) from None
        except Exception as e:  # a late failure (unreadable image, out of memory, ...): save first
            run.log.close()
            saved = run.checkpoints.save_interrupted(st.epoch, st.done_batches)
            if isinstance(e, UserError):
                raise UserError(f"{e} (at step {st.global_step}: {saved})") from None
            logger.error("training failed at step %d (%s: %s): %s", st.global_step, type(e).__name__, e, saved)
            raise
    run.log.close()
    return finish(run)


# ------------------------------------------------------------------ set up
def set_up(args, plan: Plan) -> Run:
    """Accelerator, models, data, network, optimizer, schedule and the resumed state, in the order
    that keeps the global random stream (and so the network's initial weights) reproducible."""
    started = time.time()
    log_dir = logging_dir(args)
    if log_dir:  # one folder per run, as sd-scripts names it: reruns no longer merge their curves
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(started))
        log_dir = os.path.join(log_dir, (args.log_prefix or "") + stamp)
    log_with = args.log_with or ("tensorboard" if log_dir else None)
    accelerator = _accelerator(args, log_dir, log_with)
    if accelerator.is_main_process:
        for note in plan.notes:
            logger.info(note)
    from accelerate.utils import set_seed

    set_seed(plan.seed)
    ensure_embedded(plan, args, accelerator)
    models = load_models(plan.model_path, args)
    dataset = build_dataset(args, plan, accelerator.is_main_process)
    place(models, accelerator.device, args.mixed_precision, args.gradient_checkpointing)
    if getattr(args, "xformers", False) and xformers_usable():
        models.unet.enable_xformers_memory_efficient_attention()
    network = build_network(args, plan, models)
    opt_name, opt_args, optimizer, descriptions = build_optimizer(args, network)
    schedule = plan_schedule(args, dataset, accelerator.num_processes)
    warn_if_optimizer_phases_cover_the_run(optimizer, schedule.max_steps)
    warn_if_lr_is_low_for_automagic(optimizer)
    lr_scheduler = build_lr_scheduler(args, optimizer, schedule)
    # The network is not wrapped in DDP: its forward runs through the hooked U-Net / text
    # encoder, never through the wrapper, so DDP would not synchronise it. Gradients are
    # averaged across processes explicitly (average_gradients) before each update instead.
    optimizer = accelerator.prepare(optimizer)
    accelerator.register_for_checkpointing(network)
    accelerator.register_for_checkpointing(lr_scheduler)
    state = TrainingState(plan.seed)
    start_batch = _resume(args, plan, accelerator, state)
    fourier = _fourier_active(args, models, plan.resolution, accelerator)
    loss = step_mod.DiffusionLoss(args, models, fourier_active=fourier,
                                  train_text_encoder=not args.network_train_unet_only, autocast=accelerator.autocast)
    if args.cache_latents or args.cache_latents_to_disk:
        loss.cached_latents = cache_latents(dataset, models, to_disk=args.cache_latents_to_disk)
    if getattr(args, "cache_text_encoder_outputs", False):  # fixed captions only (options.py): prefix / suffix
        loss.cache_prompts([dataset.caption(it.caption, dataset.subsets[it.subset].captions, Augment())
                            for it in dataset.items])
    draws = step_mod.Draws(state.noise_gen, accelerator.num_processes, accelerator.process_index)
    run = Run(args, plan, accelerator, models, dataset, accelerator.unwrap_model(network), optimizer, lr_scheduler,
              schedule, state, loss, draws, optimizer_name=opt_name, start_batch=start_batch, started=started)
    facts = RunFacts(uuid.uuid4().hex, started, dataset.num_images, schedule.batches_per_epoch, schedule.num_epochs,
                     schedule.max_steps, schedule.warmup_steps, f"{opt_name}({opt_args})", plan.resolution,
                     dataset.folders, dataset.tag_frequency(), dataset.bucket_info(), file_keys(args, plan.model_path),
                     weights_dim_alpha(run.network) if args.dim_from_weights else None, dataset.num_reg_images,
                     dataset.reg_folders)
    run.augment = Augment(state.flip_gen, state.caption_gen)
    run.checkpoints = Checkpointer(
        args, accelerator, run.network, state, optimizer_identity(plan.optimizer_cls, plan.optimizer_kwargs),
        metadata=lambda: build_metadata(args, plan, facts, state.global_step, state.epoch + bool(state.done_batches)))
    run.log = RunLog(args, accelerator, log_with, log_dir, schedule.max_steps, state.global_step, descriptions)
    run.sampler = Sampler(args, models, run.network, accelerator, plan.resolution)
    return run


def _accelerator(args, log_dir: str | None, log_with: str | None):
    from accelerate import Accelerator

    try:  # accelerate keeps gradient-accumulation settings in a process-wide singleton: start fresh
        from accelerate.state import GradientState

        GradientState._reset_state()
    except (ImportError, AttributeError):  # pragma: no cover - older accelerate
        pass
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=_trackers(log_with) if log_dir else None,
        project_dir=log_dir,
        # several processes without CUDA: gloo on CPU (plain `accelerate launch --multi_gpu` works)
        cpu=launched > 1 and not torch.cuda.is_available(),
    )
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
                        "on CPU use `accelerate launch --multi_gpu --num_processes N` or torchrun")
    return accelerator


def _trackers(log_with: str | None) -> list | None:
    """accelerate trackers for --log_with: TensorBoard, wandb (when installed), or both ("all")."""
    import importlib.util

    names = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(log_with, [])
    names = [n for n in names if n != "wandb" or importlib.util.find_spec("wandb") is not None]
    return names or None


def _resume(args, plan: Plan, accelerator, state: TrainingState) -> int:
    """Load a saved state into the accelerator and ``state``; returns the batch to start at."""
    if plan.resume_state is None:
        return 0
    accelerator.load_state(args.resume)
    start_batch = state.resume_from(args.resume, plan.resume_state)
    logger.info("resumed from %s at step %d", args.resume, state.global_step)
    return start_batch


def _fourier_active(args, models: Models, resolution: tuple[int, int], accelerator) -> bool:
    """This trainer compares VAE latents, where an FFT loss has no image meaning: --loss_type fourier
    falls back to l2 there unless --fourier_latent_ok."""
    if args.loss_type != "fourier" or args.fourier_latent_ok:
        return args.loss_type == "fourier"
    channels, factor = models.latent_channels, models.vae_factor
    shape = (1, channels, resolution[1] // factor, resolution[0] // factor)
    if not is_latent_space(torch.empty(shape), channels, factor, resolution[0]):
        return True
    if accelerator.is_main_process:
        logger.warning("--loss_type fourier: training runs in latent space (%d-channel VAE latents), where the FFT "
                       "loss has no image meaning; it is disabled and the base l2 loss is used "
                       "(pass --fourier_latent_ok to keep it)", channels)
    return False


# ------------------------------------------------------------------- train
def run_epochs(run: Run, stops: StopRequests) -> None:
    st, sch, args = run.state, run.schedule, run.args
    first_epoch = st.epoch
    for epoch in range(first_epoch, sch.num_epochs):
        if st.global_step >= sch.max_steps:
            break
        st.epoch = epoch
        run.augment.epoch = epoch + 1
        if hasattr(run.network, "on_epoch_start"):
            run.network.on_epoch_start(run.models.text_encoder, run.models.unet)
        batches = run.dataset.epoch_batches(run.plan.seed, epoch, sch.global_batch, pad=sch.world > 1)
        start = run.start_batch if epoch == first_epoch else 0
        st.batch_in_epoch = st.done_batches = start
        for b in range(start, sch.batches_per_epoch):
            if st.global_step >= sch.max_steps:
                break
            train_batch(run, stops, batches[b])
        run.sampler.maybe_sample(st.global_step, epoch + 1)
        if args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0 and st.global_step < sch.max_steps:
            _periodic_save(run, f"{args.output_name}-{epoch + 1:06d}", epoch + 1, 0)
            _drop_old_epoch_saves(run, epoch + 1)


def train_batch(run: Run, stops: StopRequests, global_batch: list) -> None:
    """One batch of the epoch: forward, backward and (at the end of an accumulation) the update."""
    st, args, acc = run.state, run.args, run.accelerator
    st.batch_in_epoch += 1
    idx = rank_share(global_batch, args.train_batch_size, run.draws.rank)
    loss, finite = _forward_backward(run, idx)
    if not finite:
        st.bad_steps += 1
        logger.warning("step %d: non-finite loss or gradients (loss %s), update skipped (%d in a row)",
                       st.global_step + 1, float(loss.detach()), st.bad_steps)
        if st.bad_steps >= args.max_bad_steps:
            stops.stop(f"{st.bad_steps} consecutive non-finite losses")
            raise _Stop()
        return
    st.bad_steps = 0
    if not acc.sync_gradients:
        return
    _after_update(run, loss)
    if stops.reason:
        raise _Stop()


def _forward_backward(run: Run, idx: list):
    """Loss, backward, gradient sync and clipping, and the optimizer step when the gradients are
    finite; returns ``(loss, finite)``. A non-finite loss or gradient norm skips the step."""
    acc, net, m = run.accelerator, run.network, run.models
    with acc.accumulate(net):
        if hasattr(net, "on_step_start"):
            net.on_step_start(m.text_encoder, m.unet)
        loss = run.loss(run.dataset, idx, run.draws, run.augment, run.state.global_step)
        finite = bool(torch.isfinite(loss.detach()))
        if finite:
            acc.backward(loss)
            finite = _sync_and_clip(run)
            if finite:
                run.optimizer.step()
                if acc.sync_gradients and hasattr(run.base_optimizer, "report_loss"):
                    run.base_optimizer.report_loss(loss.detach())  # once per real update
        run.optimizer.zero_grad(set_to_none=True)
    return loss, finite


def _sync_and_clip(run: Run) -> bool:
    """At the end of an accumulation: average across processes, clip; False for a non-finite norm."""
    acc, args = run.accelerator, run.args
    if not acc.sync_gradients:
        return True
    if run.draws.world > 1:
        average_gradients(run.network)
    if args.max_grad_norm and args.max_grad_norm > 0:
        total = acc.clip_grad_norm_(run.network.get_trainable_params(), args.max_grad_norm)
        if total is not None and not bool(torch.isfinite(torch.as_tensor(total))):
            return False
    return True


def _after_update(run: Run, loss) -> None:
    st, args = run.state, run.args
    run.lr_scheduler.step()
    st.global_step += 1
    st.done_batches = st.batch_in_epoch
    st.losses.append(float(loss.detach()))
    if args.scale_weight_norms and hasattr(run.network, "apply_max_norm_regularization"):
        run.network.apply_max_norm_regularization(args.scale_weight_norms, run.models.device)
    run.log.update(st.global_step, st.losses, run.lr_scheduler.get_last_lr(), run.base_optimizer)
    run.sampler.maybe_sample(st.global_step)
    every = args.save_every_n_steps
    if every and st.global_step % every == 0 and st.global_step < run.schedule.max_steps:
        _periodic_save(run, f"{args.output_name}-step{st.global_step:08d}", st.epoch, st.batch_in_epoch)
        _drop_old_step_saves(run, st.global_step)


def _keep_states(args, unit: str) -> int:
    """--save_last_n_<unit>_state, or --save_last_n_<unit> when it is not given (sd-scripts' rule)."""
    return getattr(args, f"save_last_n_{unit}_state") or getattr(args, f"save_last_n_{unit}") or 0


def _drop_old_epoch_saves(run: Run, epoch: int) -> None:
    """--save_last_n_epochs(_state): the epoch save that many intervals back goes (sd-scripts' rule)."""
    args = run.args
    keep_models, keep_states, every = args.save_last_n_epochs or 0, _keep_states(args, "epochs"), args.save_every_n_epochs
    _drop_old_saves(run, f"{args.output_name}-{{:06d}}", epoch - every * keep_models if keep_models else None,
                    epoch - every * keep_states if keep_states else None)


def _drop_old_step_saves(run: Run, step: int) -> None:
    """--save_last_n_steps(_state): the step save now older than the kept steps goes (sd-scripts' arithmetic)."""
    args = run.args

    def expired(keep: int) -> int | None:
        if not keep:
            return None
        old = step - keep - 1
        return old - old % args.save_every_n_steps

    _drop_old_saves(run, f"{args.output_name}-step{{:08d}}", expired(args.save_last_n_steps or 0),
                    expired(_keep_states(args, "steps")))


def _drop_old_saves(run: Run, pattern: str, model_number: int | None, state_number: int | None) -> None:
    if not run.accelerator.is_main_process:
        return
    if model_number is not None and model_number > 0:
        run.checkpoints.remove(pattern.format(model_number) + run.checkpoints.ext)
    if state_number is not None and state_number > 0 and run.args.save_state:
        run.checkpoints.remove(pattern.format(state_number) + "-state")


def _periodic_save(run: Run, name: str, epoch: int, batch_in_epoch: int) -> None:
    run.checkpoints.save_model(name)
    if run.args.save_state:
        run.last_periodic_state = run.checkpoints.save_state(f"{name}-state", epoch, batch_in_epoch)


# ------------------------------------------------------------------ finish
def finish(run: Run) -> dict:
    """Final LoRA (and state), stale emergency saves removed, the loss curve, the summary."""
    args, st, acc = run.args, run.state, run.accelerator
    if run.draws.world > 1:
        check_ranks_in_sync(acc, run.network)
    final = run.checkpoints.save_model(args.output_name)
    state_dir = None
    if args.save_state or args.save_state_on_train_end:
        epoch_done = st.batch_in_epoch >= run.schedule.batches_per_epoch
        state_dir = run.checkpoints.save_state(f"{args.output_name}-state", st.epoch + (1 if epoch_done else 0),
                                               0 if epoch_done else st.batch_in_epoch)
    plot = None
    if acc.is_main_process:
        run.checkpoints.remove_stale_interrupted()
        if st.losses:
            title = f"{args.output_name} | {type(run.base_optimizer).__name__} | lr {args.learning_rate:g}"
            plot = plot_losses(st.losses, os.path.join(args.output_dir, f"{args.output_name}_loss.png"), title)
    acc.end_training()
    elapsed = time.time() - run.started
    if acc.is_main_process:
        print(summary_line(st.global_step, elapsed, st.losses, type(run.base_optimizer).__name__, final, plot))
    return {
        "file": final, "state": state_dir, "loss_plot": plot, "steps": st.global_step,
        "final_loss": st.losses[-1] if st.losses else None, "seconds": elapsed, "optimizer": run.optimizer_name,
        "optimizer_object": run.base_optimizer, "network": run.network, "losses": st.losses,
    }
