"""SIGINT / SIGTERM become a request to stop after the current update (the loop saves, then stops)."""
from __future__ import annotations

import signal
import threading


class StopRequests:
    """While active (a ``with`` block in the main thread), a signal sets ``reason`` / ``signal_name``
    instead of killing the process; the previous handlers come back on exit."""

    def __init__(self):
        self.reason: str | None = None
        self.signal_name: str | None = None
        self._old = {}

    def stop(self, reason: str) -> None:
        self.reason = reason

    def _on_signal(self, signum, frame):
        self.reason = self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
        return False
