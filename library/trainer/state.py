"""Where a run is: its position in the data, its losses, and its three random streams.

Resuming is bit-exact because everything that decides the next update is here or in what
accelerate saves (network, optimizer, scheduler, global RNG states): the batch order is a pure
function of (seed, epoch), and the noise / timestep draws, the flips and the caption shuffles come
from three dedicated generators whose states are saved with the training state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

GENERATORS_FILE = "generators.pt"


@dataclass
class TrainingState:
    seed: int
    global_step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of this epoch started, the current one included
    done_batches: int = 0  # batches of this epoch whose update went through
    losses: list = field(default_factory=list)
    bad_steps: int = 0  # consecutive updates skipped for a non-finite loss or gradient
    noise_gen: torch.Generator = field(init=False)
    flip_gen: torch.Generator = field(init=False)
    caption_gen: torch.Generator = field(init=False)  # shuffles and drops caption tags

    def __post_init__(self):
        self.noise_gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.flip_gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        self.caption_gen = torch.Generator(device="cpu").manual_seed(self.seed + 2)

    def to_json(self, epoch: int, batch_in_epoch: int) -> dict:
        """The saved position: resuming starts at batch ``batch_in_epoch`` of epoch ``epoch``."""
        return {"global_step": self.global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "losses": self.losses, "seed": self.seed}

    def save_generators(self, folder: str) -> None:
        torch.save({"noise": self.noise_gen.get_state(), "flip": self.flip_gen.get_state(),
                    "caption": self.caption_gen.get_state()}, os.path.join(folder, GENERATORS_FILE))

    def resume_from(self, folder: str, saved: dict) -> int:
        """Take the position and the generators of a saved state; returns the batch to start at."""
        self.global_step = int(saved["global_step"])
        self.epoch = int(saved["epoch"])
        self.losses = list(saved.get("losses", []))
        generators = torch.load(os.path.join(folder, GENERATORS_FILE), weights_only=True)
        self.noise_gen.set_state(generators["noise"])
        self.flip_gen.set_state(generators["flip"])
        if "caption" in generators:  # states saved before caption options existed never drew from it
            self.caption_gen.set_state(generators["caption"])
        return int(saved["batch_in_epoch"])
