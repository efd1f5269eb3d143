"""The two ways a run ends early, each caught at the CLI edge and printed as one line.

- :class:`UserError`: a mistake in the user's input (arguments, config, data). Exit code 2.
- :class:`TrainingStopped`: training stopped after saving the LoRA and the state (a signal, or
  too many non-finite steps). Exit code 128 + signal number for a signal (130 for SIGINT / Ctrl-C,
  143 for SIGTERM), as shells report a process killed by it; 1 for any other stop.
"""
from __future__ import annotations

import signal


class UserError(ValueError):
    """A mistake in the user's input (arguments, config, data); the message names the culprit."""


class TrainingStopped(RuntimeError):
    """Training ended before its last step; the LoRA and the training state were saved first."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code_for(signal_name)


def exit_code_for(signal_name: str | None) -> int:
    """128 + the signal's number for ``"SIGINT"`` / ``"SIGTERM"`` (130 / 143); 1 otherwise."""
    if signal_name and hasattr(signal, signal_name):
        return 128 + int(getattr(signal, signal_name))
    return 1
