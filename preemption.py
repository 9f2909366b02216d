"""Graceful stop on SIGTERM/SIGINT: finish the step, save, exit (schedulers pre-empt with SIGTERM)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch

from distributed import all_reduce_sum, is_multi_process

logger = logging.getLogger(__name__)


def ignore_stop_signals() -> None:
    """SIGTERM and SIGINT ignored in this process: for data-loader workers.

    torchrun stops a worker group with ``killpg`` (SIGTERM to every process of the group), Slurm
    signals every process of a job step, and Ctrl-C reaches the whole foreground group. A loader
    worker would die of it (torch's handler lets only the parent's SIGTERM end it cleanly), and
    the trainer's next batch would raise "DataLoader worker exited unexpectedly" in the middle of
    the step it was finishing to save. The main process handles the signal (:class:`StopRequest`);
    workers end when their loader shuts them down or their parent is gone.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Records a termination signal instead of dying mid-step; the trainer polls :meth:`agreed`."""

    def __init__(self, poll_every: int = 1) -> None:
        self.signal_name: str | None = None
        self.poll_every = max(1, int(poll_every))
        self._previous = {}

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: finishing this step, then saving a checkpoint and exiting", self.signal_name)

    def agreed(self, device: torch.device, step: int = 0) -> bool:
        """True on every rank once any rank was signalled (all ranks must stop at the same step).

        One process: its own flag, with no device work. Several: the flag is summed over the ranks
        at every ``poll_every``-th optimizer ``step`` only (an all-reduce read back on the host
        would stall every GPU each step); all ranks poll at the same steps, so they stop together.
        """
        if not is_multi_process():
            return self.signal_name is not None
        if step % self.poll_every:
            return False
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)
