"""Stop cleanly on a scheduler's signal (SLURM sends SIGTERM before a preemption or the time limit):
finish the current step, save a checkpoint, exit 0 -- as Megatron-LM's ``--exit-signal-handler``.

A second signal stops the process at once (the default action). Every rank installs the handler; after each step the ranks agree (one MAX all-reduce of a flag) on
whether any of them was signalled, so all of them save and stop after the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

SIGNAL_NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def check_signal_names(names: Sequence[str], where: str = "checkpoint.exit_signals") -> None:
    bad = [n for n in names if n not in SIGNAL_NAMES]
    if bad:
        raise ValueError(f"{where} has {bad}; allowed: {list(SIGNAL_NAMES)}")


class ExitSignals:
    """``with ExitSignals(["SIGTERM"]) as signals: ... if signals.stop_requested(): save; break``."""

    def __init__(self, names: Sequence[str]) -> None:
        check_signal_names(names)
        self.names: List[str] = list(names)
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.received is not None:  # a second signal: stop now, as without the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "ExitSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to install here
        for name in self.names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def stop_requested(self) -> bool:
        """True on every rank when any rank has been signalled (collective when distributed)."""
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
