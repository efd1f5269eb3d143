"""The LoRA / LoKr trainer behind ``train_network.py`` (sd-scripts compatible), in named pieces:

- :mod:`.options`: every user-facing check, before any model loads -> :class:`Plan`
- :mod:`.models`: the frozen model (loading, placing, its facts)
- :mod:`.data`: the dataset as the loop sees it (cached latents, each process's batch share)
- :mod:`.network`: the network, its optimizer with named groups, the schedule
- :mod:`.step`: one batch's diffusion loss
- :mod:`.state`: where a run is (position, losses, random streams)
- :mod:`.checkpoint`: saves, emergency saves, ``--resume`` checks
- :mod:`.logs`, :mod:`.metadata`, :mod:`.signals`, :mod:`.distributed`
- :mod:`.loop`: set up, train, finish

Order of work: :func:`prepare` checks everything (a mistake ends with one line and exit code 2),
then :func:`train` loads the model and trains. Resuming is bit-exact (see :mod:`.state`).
"""
from .loop import train
from .metadata import build_metadata
from .network import warn_if_lr_is_low_for_automagic, warn_if_optimizer_phases_cover_the_run
from .options import Plan, cache_dir, parse_resolution, parse_warmup, prepare
from .step import DiffusionLoss, Draws

__all__ = ["Plan", "prepare", "train", "build_metadata", "parse_warmup", "parse_resolution", "cache_dir",
           "DiffusionLoss", "Draws", "warn_if_optimizer_phases_cover_the_run",
           "warn_if_lr_is_low_for_automagic"]
