"""Turn SIGTERM / SIGUSR1 / SIGINT (or a stop file) into a "checkpoint and stop" request agreed
on by every rank.

Ctrl-C (SIGINT) stops like SIGTERM: the step (or checkpoint save) in progress finishes, a
checkpoint is saved and the run exits 0; a second Ctrl-C aborts at once (KeyboardInterrupt).

The stop file serves launchers whose processes a signal cannot reach cleanly: a Slurm batch
script writes `$HM_STOP_FILE` when its pre-time-limit signal arrives, whether the ranks run
as srun tasks or under torchrun (whose agent dies on SIGUSR1). Rank 0 looks for the file at
every step boundary; the all-reduce in `agreed()` tells every other rank.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from hybrid_megatron.megatron_compat.checkpoint_writer import start_checkpoint_writer_ignoring

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_FILE_ENV = "HM_STOP_FILE"


class StopRequest:
    """Records a received signal (or finds the stop file); `agreed()` is collective (any rank's
    signal stops all)."""

    def __init__(self, signals=DEFAULT_SIGNALS, enabled: bool = True) -> None:
        self.received: int | None = None
        self.stop_file = os.environ.get(STOP_FILE_ENV) if enabled else None
        self.file_reason: str | None = None
        self._previous = {}
        if enabled:
            start_checkpoint_writer_ignoring(signals)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT and (not dist.is_initialized() or dist.get_rank() == 0):
                # os.write, not print: a handler may interrupt a print in progress
                os.write(2, b"\nstopping: finishing this step and saving a checkpoint "
                            b"(Ctrl-C again to abort without saving)\n")  # fmt: skip

    def _file_requested(self) -> bool:
        if not self.stop_file or (dist.is_initialized() and dist.get_rank() != 0):
            return False
        try:
            with open(self.stop_file) as f:
                self.file_reason = f.read().strip() or self.stop_file
        except OSError:
            return False
        return True

    def agreed(self, device: torch.device) -> bool:
        asked = self.received is not None or self._file_requested()
        flag = torch.tensor([1.0 if asked else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        if self.received is not None:
            return signal.Signals(self.received).name
        return f"stop file: {self.file_reason}" if self.file_reason else "signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
