"""Saving and resuming: LoRA files, training-state folders, emergency saves, ``--resume`` checks.

Every save is atomic: a state folder is written beside its final name and swapped in, so a
crash mid-save leaves the previous one intact.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Callable

import torch

from ..errors import UserError
from .state import TrainingState

logger = logging.getLogger("train_network")

STATE_FILE = "train_state.json"
MODEL_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def optimizer_identity(cls, kwargs: dict) -> dict:
    """What a saved optimizer state depends on: the class and the width of its state (8 or 32 bit)."""
    return {"optimizer": f"{cls.__module__}.{cls.__name__}", "optim_bits": int(kwargs.get("optim_bits", 32) or 32)}


def read_resume_state(folder: str, cls, kwargs: dict) -> dict:
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
    _check_same_optimizer(folder, state, cls, kwargs)
    return state


def _check_same_optimizer(folder: str, state: dict, cls, kwargs: dict) -> None:
    now = optimizer_identity(cls, kwargs)
    saved = {k: state.get(k, now[k]) for k in now}  # states written before optim_bits was recorded
    if saved["optimizer"] != now["optimizer"] and saved["optimizer"].rsplit(".", 1)[-1] != cls.__name__:
        raise UserError(f"--resume {folder!r} was saved by {saved['optimizer']}, not {now['optimizer']}: "
                        "resume with the same --optimizer_type (its state cannot be carried over)")
    if saved["optim_bits"] != now["optim_bits"]:
        raise UserError(f"--resume {folder!r} holds {saved['optim_bits']}-bit optimizer state, this run asks for "
                        f"{now['optim_bits']}-bit: resume with the same optim_bits / --optimizer_type")


def atomic_dir_swap(tmp: str, final: str) -> None:
    if os.path.isdir(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class Checkpointer:
    """Writes the LoRA (with its metadata) and the training state under ``--output_dir``."""

    def __init__(self, args, accelerator, network, state: TrainingState, identity: dict,
                 metadata: Callable[[], dict]):
        self.output_dir = args.output_dir
        self.output_name = args.output_name
        self.ext = MODEL_EXTENSIONS[args.save_model_as]
        self.dtype = SAVE_DTYPES.get(args.save_precision)
        self.accelerator = accelerator
        self.network = network
        self.state = state
        self.identity = identity
        self.metadata = metadata
        os.makedirs(self.output_dir, exist_ok=True)

    def save_model(self, name: str) -> str:
        file = os.path.join(self.output_dir, name + self.ext)
        if self.accelerator.is_main_process:
            self.network.save_weights(file, self.dtype, self.metadata())
        return file

    def save_state(self, name: str, epoch: int, batch_in_epoch: int) -> str:
        """The accelerate state plus our generators and position, swapped in atomically."""
        acc = self.accelerator
        final = os.path.join(self.output_dir, name)
        tmp = final + ".tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.save_state(tmp)
        if acc.is_main_process:
            self.state.save_generators(tmp)
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({**self.state.to_json(epoch, batch_in_epoch), **self.identity}, f)
            atomic_dir_swap(tmp, final)
        acc.wait_for_everyone()
        return final

    def save_interrupted(self, epoch: int, batch_in_epoch: int) -> str:
        """Save the LoRA and the training state as ``<name>-interrupted``; never raises (it runs while
        another error is on its way out), and says what it saved or why it could not."""
        try:
            file = self.save_model(f"{self.output_name}-interrupted")
            state_dir = self.save_state(f"{self.output_name}-interrupted-state", epoch, batch_in_epoch)
        except Exception as e:  # pragma: no cover - disk full or gone while saving
            logger.error("the emergency save failed too: %s", e)
            return f"the emergency save failed ({type(e).__name__}: {e})"
        return f"saved {file} and {state_dir} (resume with --resume {state_dir})"

    def remove(self, name: str, why: str = "--save_last_n_*") -> None:
        """Delete the file or state folder ``name`` under the output folder, if there (one log line)."""
        path = os.path.join(self.output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path):
            os.remove(path)
        else:
            return
        logger.info("removed %s (%s)", path, why)

    def remove_stale_interrupted(self) -> None:
        """A run that finished supersedes the ``-interrupted`` LoRA and state an earlier stop left."""
        for name in (f"{self.output_name}-interrupted{self.ext}", f"{self.output_name}-interrupted-state"):
            self.remove(name, "this run finished after it")
